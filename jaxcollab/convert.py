"""Convert a llama.cpp GGUF Llama into a Hugging Face model directory.

    python -m jaxcollab.convert FILE.gguf --out=HF_DIR [--dtype=float32|bfloat16|float16] [--overwrite]

The directory gets config.json, safetensors shards with their index, generation_config.json (BOS, EOS and
PAD ids) and the tokenizer rebuilt from the file's metadata (tokenizer.json, tokenizer_config.json with the
chat template, special_tokens_map.json); `transformers.AutoModelForCausalLM` / `AutoTokenizer` and
`jaxcollab.model.load_hf` read it. Weights are dequantized to float32 (see jaxcollab.model.gguf) and stored
in --dtype. The conversion streams: each tensor is dequantized when its turn to be written comes, so host
memory holds about one tensor, and no accelerator is used. The directory is written atomically: on any
error nothing appears at --out.

Every problem with the call or the file (a missing file, another architecture, an unsupported tensor type
or tokenizer, a truncated file, an existing --out without --overwrite) is reported as `error: ...` with
exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from absl import flags

from jaxcollab.cli import UsageError, check_output_dir, run_absl_command, run_command

if TYPE_CHECKING:  # the library is imported only when a conversion runs, so that --help and bad calls are quick
    import numpy as np
    from tqdm import tqdm

    from jaxcollab.model import LlamaConfig
    from jaxcollab.model.gguf import GGUFFile
    from jaxcollab.model.safetensors_io import TensorToWrite

DTYPES = ("float32", "bfloat16", "float16")
USAGE = "python -m jaxcollab.convert FILE.gguf --out=HF_DIR [--dtype=float32|bfloat16|float16] [--overwrite]"


def _define_flags() -> None:
    flags.DEFINE_string("out", None, "Output Hugging Face model directory (written atomically).")
    flags.DEFINE_string("dtype", "float32", f"dtype the weights are stored in: {', '.join(DTYPES)}.")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists and is not empty.")
    flags.DEFINE_bool("progress", True, "Show a progress bar while converting.")


@dataclasses.dataclass(frozen=True)
class ConvertArgs:
    gguf: str
    out: str
    dtype: str = "float32"
    overwrite: bool = False
    progress: bool = True


def validate(args: ConvertArgs) -> None:
    """Everything that can be checked before reading the file."""
    if not args.gguf:
        raise UsageError(f"no GGUF file given; usage: {USAGE}")
    if not Path(args.gguf).is_file():
        raise UsageError(f"{args.gguf}: no such file")
    check_output_dir(args.out, args.overwrite)
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")


def _generation_config(cfg: LlamaConfig) -> dict[str, Any]:
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}


def _streamed_tensors(source: GGUFFile, cfg: LlamaConfig, shapes: dict[str, tuple[int, ...]], np_dtype: np.dtype,
                      bar: tqdm) -> list[TensorToWrite]:
    """The HF tensors `shapes` (in `save_hf`'s order), each dequantized from the GGUF file only when it is
    written."""
    from jaxcollab.model import gguf
    from jaxcollab.model.safetensors_io import TensorToWrite

    def producer(name: str) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            values = gguf.read_hf_tensor(source, cfg, name).astype(np_dtype)
            bar.update(1)
            return values

        return produce

    return [TensorToWrite(name, shape, np_dtype, producer(name)) for name, shape in shapes.items()]


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                 overwrite: bool = False, progress: bool = False) -> Path:
    """Write the Hugging Face directory of GGUF Llama `gguf_path` to `out_dir` (atomically) and return it.

    Raises FileNotFoundError, FileExistsError (`out_dir` not empty and not `overwrite`), CheckpointError
    (unreadable file, another architecture, unsupported tensor type or tokenizer) or ConfigError.
    """
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    from jaxcollab.atomic import atomic_directory
    from jaxcollab.model.config import dtype_name
    from jaxcollab.model.gguf import GGUFFile, check_tensors, read_config
    from jaxcollab.model.gguf_tokenizer import read_gguf_tokenizer, write_tokenizer_files
    from jaxcollab.model.hf import hf_tensor_shapes, write_hf_directory

    storage = dtype_name(dtype)
    np_dtype = np.dtype(jnp.dtype(storage))
    source = GGUFFile(gguf_path)
    cfg = read_config(source, param_dtype=storage, dtype=storage)
    check_tensors(source, cfg)
    tokenizer = read_gguf_tokenizer(source)  # fails before anything is written
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        shapes = hf_tensor_shapes(cfg)
        with tqdm(total=len(shapes), desc=f"convert {source.path.name}", unit="tensor", disable=not progress,
                  leave=False) as bar:
            tensors = _streamed_tensors(source, cfg, shapes, np_dtype, bar)
            # `tmp` is empty: write_hf_directory fills it through its own temporary sibling.
            write_hf_directory(tmp, tensors, cfg.to_hf_dict(torch_dtype=storage), overwrite=True)
        write_tokenizer_files(tokenizer, tmp)
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(cfg), indent=2) + "\n")
    return out_dir


def run(args: ConvertArgs) -> str:
    """Convert as `args` says; return a one-line summary. Bad input of any kind raises UsageError."""
    from jaxcollab.model import CheckpointError, ConfigError

    validate(args)
    start = time.time()
    try:
        convert_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=args.progress)
    except (CheckpointError, ConfigError, FileNotFoundError, FileExistsError) as error:
        raise UsageError(str(error)) from None
    return f"converted {args.gguf} -> {args.out} ({args.dtype}, {time.time() - start:.1f}s)"


def _main(argv: Sequence[str]) -> int:
    f = flags.FLAGS
    files = list(argv[1:])

    def make_args() -> ConvertArgs:
        if len(files) != 1:
            raise UsageError(f"give exactly one GGUF file (got {files}); usage: {USAGE}")
        return ConvertArgs(gguf=files[0], out=f.out, dtype=f.dtype, overwrite=f.overwrite, progress=f.progress)

    return run_command(argv[:1], make_args, run, ())


def main() -> None:
    _define_flags()
    run_absl_command(__doc__, _main)


if __name__ == "__main__":
    main()

"""Mix fine-tuned Llama models into one Mixtral mixture of experts and write it as a Hugging Face directory.

    python -m jaxcollab.mix --base=HF_DIR --experts=HF_DIR,HF_DIR --router=noisy --top-k=2 --out=HF_DIR
    python -m jaxcollab.mix --base=HF_DIR --experts=A,B --router=hidden --prompts=prompts.jsonl --out=HF_DIR

Embeddings, attention, norms and the head come from --base (or the mean of the experts with
--shared=average); each expert model's MLP becomes one expert of every layer; each layer gets a router
(see jaxcollab.moe). Router modes: gateless (uniform average of all experts: top-k = number of experts,
zero router), noisy (N(0, 0.02) router, top-k), hidden (router columns from the base's mean hidden states
on each expert's prompts; --prompts is a JSONL file of {"expert": INDEX, "prompt": TEXT} rows, INDEX
counting experts in --experts order, the base first with --include_base; the prompts are tokenized with
--tokenizer, by default the tokenizer files in --base, or "bytes" for the byte-level tokenizer).

The output is a classic Mixtral checkpoint (block_sparse_moe.gate, block_sparse_moe.experts.E.w1/w2/w3)
that transformers 4.x and 5.x read. It is written atomically: on any error nothing is written to --out.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from jaxcollab.cli import DTYPES, UsageError, check_input_dirs, check_output_dir, run_absl_command, run_command


def _define_flags() -> None:
    flags.DEFINE_string("base", None, "Base model: a Hugging Face Llama directory.")
    flags.DEFINE_list("experts", [], "Fine-tuned HF Llama directories: each one's MLP becomes an expert.")
    flags.DEFINE_enum("router", "noisy", ["gateless", "noisy", "hidden"], "How the routers are initialised.")
    flags.DEFINE_integer("top-k", 2, "Experts per token (noisy, hidden); gateless uses all.")
    flags.DEFINE_alias("top_k", "top-k")
    flags.DEFINE_string("prompts", None, "JSONL of {\"expert\": INDEX, \"prompt\": TEXT} for --router=hidden.")
    flags.DEFINE_string("tokenizer", None, "Tokenizer for --prompts: a HF directory (default --base) or 'bytes'.")
    flags.DEFINE_enum("shared", "base", ["base", "average"], "Where embeddings, attention, norms and head come from.")
    flags.DEFINE_bool("include_base", False, "Add the base's own MLP as expert 0.")
    flags.DEFINE_float("noise_std", 0.02, "Standard deviation of the noisy router's initialisation.")
    flags.DEFINE_integer("seed", 0, "Seed of the noisy router.")
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "dtype to load and save the models in.")
    flags.DEFINE_string("out", None, "Output HF Mixtral directory (written atomically).")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists and is not empty.")


@dataclasses.dataclass(frozen=True)
class MixArgs:
    base: str
    experts: tuple[str, ...]
    out: str
    router: str = "noisy"
    top_k: int = 2
    prompts: str | None = None
    tokenizer: str | None = None
    shared: str = "base"
    include_base: bool = False
    noise_std: float = 0.02
    seed: int = 0
    dtype: str = "float32"
    overwrite: bool = False


def validate(args: MixArgs) -> None:
    """Everything that can be checked before loading a model."""
    check_output_dir(args.out, args.overwrite)
    if not args.base:
        raise UsageError("--base is required (the model the experts were fine-tuned from)")
    if not args.experts:
        raise UsageError("--experts needs at least one fine-tuned model directory")
    check_input_dirs((args.base, *args.experts))
    num_experts = len(args.experts) + int(args.include_base)
    if args.router != "gateless" and not 1 <= args.top_k <= num_experts:
        raise UsageError(f"--top-k={args.top_k} must be between 1 and the number of experts ({num_experts})")
    if args.router == "hidden" and not args.prompts:
        raise UsageError("--router=hidden needs --prompts (JSONL rows {\"expert\": INDEX, \"prompt\": TEXT})")
    if args.prompts and not Path(args.prompts).is_file():
        raise UsageError(f"--prompts={args.prompts}: no such file")


def read_prompts(path: str, num_experts: int) -> list[list[str]]:
    """Prompts per expert from JSONL rows {"expert": INDEX, "prompt": TEXT}; every expert needs one."""
    per_expert: list[list[str]] = [[] for _ in range(num_experts)]
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                expert, prompt = row["expert"], row["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{path}:{line_number}: expected a JSON object with 'expert' and 'prompt'") from None
            if not isinstance(expert, int) or not 0 <= expert < num_experts:
                raise UsageError(f"{path}:{line_number}: expert {expert!r} is not an index in 0..{num_experts - 1}")
            if not isinstance(prompt, str) or not prompt:
                raise UsageError(f"{path}:{line_number}: 'prompt' must be a non-empty string")
            per_expert[expert].append(prompt)
    missing = [i for i, prompts in enumerate(per_expert) if not prompts]
    if missing:
        raise UsageError(f"{path}: experts {missing} have no prompts; the hidden router needs some for each")
    return per_expert


def run(args: MixArgs) -> str:
    """Build and save the mixture described by `args`; return a one-line summary. Raises on any error."""
    validate(args)
    import jax
    import jax.numpy as jnp

    from jaxcollab import model, moe
    from jaxcollab.data.tokenizers import ByteTokenizer, HFTokenizer, TokenizerError, check_fits_model

    start = time.time()
    dtype = jnp.dtype(args.dtype)
    cfg, base = model.load_hf(args.base, dtype=dtype)
    experts = [model.load_hf(path, dtype=dtype)[1] for path in args.experts]
    num_experts = len(experts) + int(args.include_base)
    router_prompts, pad_id = None, 0
    if args.router == "hidden":
        texts = read_prompts(args.prompts, num_experts)
        tokenizer = ByteTokenizer() if args.tokenizer == "bytes" else HFTokenizer(args.tokenizer or args.base)
        try:
            check_fits_model(tokenizer, cfg.vocab_size, str(args.base))
        except TokenizerError as e:
            raise UsageError(str(e)) from None
        router_prompts = [[[*tokenizer.start_ids, *tokenizer.encode(t)] for t in prompts] for prompts in texts]
        pad_id = tokenizer.pad_id
    mixed_cfg, mixed = moe.mix(
        cfg, base, experts, router=args.router, top_k=args.top_k, key=jax.random.key(args.seed),
        noise_std=args.noise_std, router_prompts=router_prompts, pad_id=pad_id, shared=args.shared,
        include_base=args.include_base,
    )
    model.save_hf(mixed_cfg, mixed, args.out, dtype=dtype, overwrite=args.overwrite)
    return (f"mixed {num_experts} experts ({args.router} router, top-{mixed_cfg.num_experts_per_tok}, shared from"
            f" {args.shared}) -> {args.out} (Mixtral, {args.dtype}, {time.time() - start:.1f}s)")


def _main(argv: Sequence[str]) -> int:
    from jaxcollab.model import CheckpointError, ConfigError
    from jaxcollab.moe import MixError

    f = flags.FLAGS

    def make_args() -> MixArgs:
        return MixArgs(
            base=f.base, experts=tuple(f.experts), out=f.out, router=f.router, top_k=f["top-k"].value,
            prompts=f.prompts, tokenizer=f.tokenizer, shared=f.shared, include_base=f.include_base,
            noise_std=f.noise_std, seed=f.seed, dtype=f.dtype, overwrite=f.overwrite,
        )

    return run_command(argv, make_args, run, (MixError, CheckpointError, ConfigError))


def main() -> None:
    _define_flags()
    run_absl_command(__doc__, _main)


if __name__ == "__main__":
    main()

"""Merge fine-tuned Llama models or LoRA adapters into one Hugging Face model directory.

    python -m jaxcollab.merge --method=ties --base=HF_DIR --models=HF_DIR,HF_DIR --density=0.2 --out=HF_DIR
    python -m jaxcollab.merge --method=ties --base=HF_DIR --adapters=PEFT_DIR,PEFT_DIR --density=0.2 --out=HF_DIR

Two semantics (see jaxcollab.merging):

--models: full task vectors, as mergekit. Each model's task vector (model - base) is merged tensor by
  tensor, file to file (jaxcollab.merge_checkpoints: memory stays at a few copies of the largest tensor),
  and added back to the base. Methods: those of jaxcollab.merging.FULL_MODEL_METHODS (listed under
  --method), among them average (uniform or weighted mean of the models, the paper's "Averaging"; --base
  optional), ties, dare_ties, breadcrumbs and della.

--adapters: LoRA factors merged separately, as PEFT's add_weighted_adapter (non-SVD path, what the paper
  used for TIES and DARE-TIES). PEFT LoRA adapters of --base are merged A with A and B with B, each
  weighted by sqrt(weight * scaling); the merged adapter is folded into the base and the result saved.
  Methods: linear, cat, ties, dare_linear, dare_ties, magnitude_prune.

Weights default to 1.0 each, density to 0.2 (the sparsifying methods). --dtype is the dtype the
models are loaded and saved in; merging itself accumulates in float32. --out is written atomically:
on any error nothing is written there.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from absl import flags

from jaxcollab.cli import DTYPES, UsageError, check_input_dirs, check_output_dir, run_absl_command, run_command


def _define_flags() -> None:
    from jaxcollab.merging import ADAPTER_METHODS, METHODS, RANDOM_METHODS, SPARSIFYING_METHODS

    flags.DEFINE_string("method", None, f"Merge method. --models: {', '.join(METHODS)}. --adapters:"
                        f" {', '.join(ADAPTER_METHODS)}.")
    flags.DEFINE_string("base", None, "Base model: a Hugging Face Llama directory.")
    flags.DEFINE_list("models", [], "Fine-tuned HF Llama directories (full task-vector merge, as mergekit).")
    flags.DEFINE_list("adapters", [], "PEFT LoRA adapter directories of --base (factors merged as PEFT).")
    flags.DEFINE_list("weights", [], "One weight per model or adapter (default 1.0 each).")
    flags.DEFINE_float("density", None, f"Fraction of each task vector kept by {', '.join(SPARSIFYING_METHODS)},"
                       " in (0, 1] (default 0.2).")
    flags.DEFINE_integer("seed", 0, f"Seed of the random draws of {', '.join(RANDOM_METHODS)}.")
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "dtype to load and save the models in.")
    flags.DEFINE_enum("majority_sign_method", "total", ["total", "frequency"],
                      "TIES sign election: sign of the sum (total) or majority of signs (frequency).")
    flags.DEFINE_float("scale", 1.0, "--models only: multiplies the merged task vector (mergekit's lambda).")
    flags.DEFINE_string("out", None, "Output HF Llama directory (written atomically).")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists and is not empty.")


@dataclasses.dataclass(frozen=True)
class MergeArgs:
    method: str
    out: str
    base: str | None = None
    models: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    density: float | None = None
    seed: int = 0
    dtype: str = "float32"
    majority_sign_method: str = "total"
    scale: float = 1.0
    overwrite: bool = False


def parse_weights(values: Sequence[str]) -> tuple[float, ...] | None:
    if not values:
        return None
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise UsageError(f"--weights must be comma-separated numbers, got {','.join(values)!r}") from None


def validate(args: MergeArgs) -> None:
    """Check everything that can be checked before loading a model (so a bad call costs nothing)."""
    from jaxcollab import merging

    check_output_dir(args.out, args.overwrite)
    if args.models and args.adapters:
        raise UsageError("give either --models (full models) or --adapters (PEFT adapters), not both")
    if not args.models and not args.adapters:
        raise UsageError("nothing to merge: give --models=HF_DIR,HF_DIR or --adapters=PEFT_DIR,PEFT_DIR")
    if not args.method:
        raise UsageError("--method is required")
    inputs = args.models or args.adapters
    kind = "models" if args.models else "adapters"
    valid = merging.METHODS if args.models else merging.ADAPTER_METHODS
    if args.method not in valid:
        hint = ""
        if args.adapters and args.method in merging.METHODS:
            hint = " (average/task_arithmetic merge full models: fold each adapter in and use --models)"
        if args.models and args.method in merging.ADAPTER_METHODS:
            hint = " (with --models, 'linear' is task_arithmetic or average)"
        raise UsageError(f"unknown method {args.method!r} for --{kind}; valid: {', '.join(valid)}{hint}")
    if args.density is not None and not 0.0 < args.density <= 1.0:
        raise UsageError(f"--density must be in (0, 1] (the fraction of each task vector kept), got {args.density}")
    if args.weights is not None and len(args.weights) != len(inputs):
        raise UsageError(f"--weights has {len(args.weights)} values for {len(inputs)} {kind}; give one per {kind[:-1]}")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.adapters and args.scale != 1.0:
        raise UsageError("--scale applies to --models merges only")
    if not args.base and not (args.models and args.method == "average"):
        raise UsageError("--base is required (the model the fine-tuned models or adapters started from)")
    check_input_dirs(([args.base] if args.base else []) + list(inputs))


def run(args: MergeArgs) -> str:
    """Perform the merge described by `args`; return a one-line summary. Raises on any error."""
    validate(args)
    import jax.numpy as jnp

    from jaxcollab import lora, merging, model
    from jaxcollab.merge_checkpoints import merge_checkpoints

    start = time.time()
    dtype = jnp.dtype(args.dtype)
    inputs = args.models or args.adapters
    if args.models:
        merge_checkpoints(args.method, args.base, args.models, args.out, weights=args.weights,
                          density=args.density, seed=args.seed, scale=args.scale,
                          majority_sign_method=args.majority_sign_method, dtype=args.dtype,
                          overwrite=args.overwrite)
        what = "models (full task vectors)"
    else:
        cfg, base = model.load_hf(args.base, dtype=dtype)
        adapters = [lora.load_peft(path, cfg, dtype=jnp.float32, params=base)[0] for path in args.adapters]
        combined = merging.merge_adapters(args.method, adapters, weights=args.weights, density=args.density,
                                          seed=args.seed, majority_sign_method=args.majority_sign_method)
        model.save_hf(cfg, lora.fold(base, combined), args.out, dtype=dtype, overwrite=args.overwrite)
        what = "adapters (LoRA factors, as PEFT)"
    details = [f"weights {list(args.weights) if args.weights else [1.0] * len(inputs)}"]
    if args.method in merging.SPARSIFYING_METHODS:
        details.append(f"density {args.density if args.density is not None else merging.DEFAULT_DENSITY}")
    if args.method in merging.RANDOM_METHODS:
        details.append(f"seed {args.seed}")
    return (f"merged {len(inputs)} {what} with {args.method} ({', '.join(details)}) onto "
            f"{args.base or args.models[0]} -> {args.out} ({args.dtype}, {time.time() - start:.1f}s)")


def _main(argv: Sequence[str]) -> int:
    from jaxcollab.lora import LoraError
    from jaxcollab.merging import MergeError
    from jaxcollab.model import CheckpointError, ConfigError

    f = flags.FLAGS

    def make_args() -> MergeArgs:
        return MergeArgs(
            method=f.method, out=f.out, base=f.base, models=tuple(f.models), adapters=tuple(f.adapters),
            weights=parse_weights(f.weights), density=f.density, seed=f.seed, dtype=f.dtype,
            majority_sign_method=f.majority_sign_method, scale=f.scale, overwrite=f.overwrite,
        )

    return run_command(argv, make_args, run, (MergeError, LoraError, CheckpointError, ConfigError))


def main() -> None:
    _define_flags()
    run_absl_command(__doc__, _main)


if __name__ == "__main__":
    main()

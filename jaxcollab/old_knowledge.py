"""Score what a model knows on the old-knowledge measures, with 95% intervals and a verdict against chance.

    python -m jaxcollab.old_knowledge --model=smollm2-135m-instruct --measures=mmlu,mmlu_cloze,mmlu_text \\
        --size=1000 --text_size=256 [--seed=0] [--out=scores.json]

--model takes what `model.path` of an experiment takes (`jaxcollab.pretrained`): an asset name, a Hugging
Face model directory, a GGUF file (converted into a temporary directory, or into --converted_dir to keep
it) or a hub id. The measures are those of `eval.old` (`jaxcollab.evaluation.old_measures`): `mmlu`,
`mmlu_cloze`, `mmlu_text`, `mmlu_known`, `lm_eval:<task>`. --size is the number of MMLU questions (or
lm-eval documents per task; for `mmlu_known`, the pool from which the questions the model answers by at
least --known_margin nats are counted), --text_size the number of `mmlu_text` documents. The subsets are
the ones an experiment with the same seed scores, so the figures here say whether an experiment's measure
can resolve anything at all before hours are spent on training.

One line per measure: the value, its 95% interval, n, and whether the value lies above chance beyond the
interval (chance: 0.25 for MMLU accuracy; -ln(vocabulary size) nats/token for `mmlu_text`; none for
lm-eval tasks). --out writes every value, interval, per-item value and detail as JSON (atomically), with
the provenance of the run. Bad calls exit 2, unusable inputs 1.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import flags

from jaxcollab.cli import DTYPES, UsageError, run_absl_command, run_command

DEFAULT_MEASURES = ("mmlu", "mmlu_cloze", "mmlu_text")


def _define_flags() -> None:
    flags.DEFINE_string("model", None, "The model: an asset name, a Hugging Face directory, a .gguf file or a hub id.")
    flags.DEFINE_list("measures", list(DEFAULT_MEASURES), "Old-knowledge measures: mmlu, mmlu_cloze, mmlu_text, "
                      "lm_eval:<task>.")
    flags.DEFINE_integer("size", 1000, "MMLU questions of mmlu and mmlu_cloze (lm-eval documents per task).")
    flags.DEFINE_integer("text_size", 256, "Held-out MMLU documents of mmlu_text.")
    flags.DEFINE_float("known_margin", 1.0, "mmlu_known: nats by which the right answer must beat every other "
                       "choice (--size is the pool the model's known questions are selected from).")
    flags.DEFINE_integer("seed", 0, "Seed of the stratified MMLU subset (an experiment's eval.old_seed).")
    flags.DEFINE_string("source", None, "MMLU JSON-lines file or cais/mmlu (default: the mmlu asset); for "
                        "lm_eval:<task>, a directory of task YAMLs.")
    flags.DEFINE_integer("batch_size", 8, "Rows per scoring batch.")
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "dtype the model is loaded in.")
    flags.DEFINE_string("converted_dir", None, "Keep a GGUF's conversion here (default: a temporary directory).")
    flags.DEFINE_string("out", None, "Write the scores as JSON to this file.")
    flags.DEFINE_bool("progress", True, "Show progress bars.")


@dataclasses.dataclass(frozen=True)
class OldKnowledgeArgs:
    model: str
    measures: tuple[str, ...] = DEFAULT_MEASURES
    size: int = 1000
    text_size: int = 256
    known_margin: float = 1.0
    seed: int = 0
    source: str | None = None
    batch_size: int = 8
    dtype: str = "float32"
    converted_dir: str | None = None
    out: str | None = None
    progress: bool = True


def validate(args: OldKnowledgeArgs) -> None:
    """Everything that can be checked before a model is loaded."""
    from jaxcollab.evaluation.old_measures import find_measure

    if not args.model:
        raise UsageError("--model is required: an asset name, a Hugging Face directory, a .gguf file or a hub id")
    if not args.measures:
        raise UsageError(f"--measures is empty; e.g. --measures={','.join(DEFAULT_MEASURES)}")
    for name in args.measures:
        try:
            find_measure(name)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if not args.known_margin > 0:
        raise UsageError(f"--known_margin must be > 0 nats, got {args.known_margin}")
    for flag, value in (("size", args.size), ("text_size", args.text_size), ("batch_size", args.batch_size)):
        if value < 1:
            raise UsageError(f"--{flag} must be >= 1, got {value}")
    if args.out and Path(args.out).is_dir():
        raise UsageError(f"--out={args.out} is a directory; name a file")


def chance_verdict(value: float, ci95: Sequence[float], chance: float | None) -> str:
    """Where a score stands against its chance level, judged by its 95% interval."""
    if chance is None:
        return "no chance level"
    low, high = ci95
    if low > chance:
        return "above chance beyond its interval"
    if high < chance:
        return "below chance beyond its interval"
    return "not resolved from chance"


def _line(name: str, value: float, ci95: Sequence[float], n: int, chance: float | None) -> str:
    chance_text = f", chance {chance:.4g}" if chance is not None else ""
    return (f"{name}: {value:.4f} [{ci95[0]:.4f}, {ci95[1]:.4f}] (n={n}{chance_text}): "
            f"{chance_verdict(value, ci95, chance)}")


def _score(args: OldKnowledgeArgs, directory: Path) -> tuple[list[str], dict[str, Any]]:
    import jax.numpy as jnp

    from jaxcollab import model
    from jaxcollab.data.tokenizers import HFTokenizer, check_fits_model
    from jaxcollab.evaluation.old_measures import evaluate_old_knowledge

    cfg, params = model.load_hf(directory, dtype=jnp.dtype(args.dtype))
    tokenizer = HFTokenizer(directory)
    check_fits_model(tokenizer, cfg.vocab_size, str(directory))
    lines, records = [], {}
    for name in args.measures:
        score = evaluate_old_knowledge(name, cfg, params, tokenizer, size=args.text_size if name == "mmlu_text"
                                       else args.size, seed=args.seed, source=args.source,
                                       batch_size=args.batch_size, progress=args.progress,
                                       known_margin=args.known_margin)
        lines.append(_line(name, score.value, score.ci95, score.n, score.chance))
        if name == "mmlu_known":  # selected by the model itself (value 1): what it selected is the information
            lines[-1] = f"mmlu_known: {score.details['selection']}"
        if "acc_norm" in score.details:
            lines.append(_line(f"{name} acc_norm", score.details["acc_norm"], score.details["acc_norm_ci95"],
                               score.n, score.chance))
        records[name] = {"value": score.value, "ci95": list(score.ci95), "n": score.n, "chance": score.chance,
                         "verdict": chance_verdict(score.value, score.ci95, score.chance),
                         "per_item": list(score.per_item), "details": score.details}
    return lines, records


def run(args: OldKnowledgeArgs) -> str:
    """Score the measures of `args`; return the report (one line per measure). Raises on any error."""
    validate(args)
    from jaxcollab.atomic import atomic_file
    from jaxcollab.pretrained import pretrained_directory
    from jaxcollab.provenance import provenance

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="jaxcollab-old-knowledge-") as scratch:
        directory, identity = pretrained_directory(args.model, Path(args.converted_dir or scratch),
                                                   progress=args.progress)
        lines, records = _score(args, directory)
    seconds = time.time() - start
    if args.out:
        report = {"model": args.model, "identity": identity, "seed": args.seed, "size": args.size,
                  "text_size": args.text_size, "measures": records,
                  "provenance": {**provenance(), "wall_seconds": seconds}}
        with atomic_file(args.out) as tmp:
            tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
        lines.append(f"wrote {args.out}")
    return "\n".join([f"{args.model} ({seconds:.0f}s):", *lines])


def _main(argv: Sequence[str]) -> int:
    from jaxcollab.assets import AssetError
    from jaxcollab.data.tokenizers import TokenizerError
    from jaxcollab.evaluation.mmlu import MmluDataError
    from jaxcollab.model import CheckpointError, ConfigError
    from jaxcollab.pretrained import PretrainedSourceError

    f = flags.FLAGS

    def make_args() -> OldKnowledgeArgs:
        return OldKnowledgeArgs(model=f.model, measures=tuple(f.measures), size=f.size, text_size=f.text_size,
                                known_margin=f.known_margin, seed=f.seed, source=f.source, batch_size=f.batch_size,
                                dtype=f.dtype, converted_dir=f.converted_dir, out=f.out, progress=f.progress)

    return run_command(argv, make_args, run,
                       (PretrainedSourceError, AssetError, MmluDataError, CheckpointError, ConfigError,
                        TokenizerError))


def main() -> None:
    _define_flags()
    run_absl_command(__doc__, _main)


if __name__ == "__main__":
    main()

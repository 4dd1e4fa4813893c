"""Child process of the merge benchmark that splits one side's merge into phases, under cProfile.

    python -m benchmarks.merge_phases ours|peer BASE MODEL,MODEL,... OUT MERGEKIT_CONFIG

Prints `PHASES_JSON {...}`: seconds per phase and the functions with the most own time (cProfile tottime).
jaxcollab's phases are its import and `merge_checkpoints` (what `python -m jaxcollab.merge --models` runs),
with its compiles; mergekit's are its import and `run_merge`.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

TAG = "PHASES_JSON "
TOP = 6


def _top(profile: cProfile.Profile) -> str:
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:TOP]  # type: ignore[attr-defined]
    return ",".join(f"{Path(file).name}:{func}:{values[2]:.2f}" for (file, _, func), values in rows)


def ours(base: str, models: list[str], out: str) -> dict[str, Any]:
    start = time.perf_counter()
    from benchmarks.common import CompileCounter
    from jaxcollab.cli import enable_compilation_cache
    from jaxcollab.merge_checkpoints import merge_checkpoints

    phases: dict[str, Any] = {"import": time.perf_counter() - start}
    enable_compilation_cache()  # as the command line does
    counter = CompileCounter()
    profile = cProfile.Profile()
    t = time.perf_counter()
    profile.enable()
    merge_checkpoints("ties", base, models, out, weights=[1.0] * len(models), density=0.2, dtype="float32",
                      progress=False)
    profile.disable()
    phases["merge_checkpoints"] = time.perf_counter() - t
    phases["compiles"] = counter.compiles
    phases["compile_s"] = counter.seconds
    phases["top_tottime"] = _top(profile)
    return phases


def peer(out: str, config_file: str) -> dict[str, Any]:
    start = time.perf_counter()
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    phases: dict[str, Any] = {"import": time.perf_counter() - start}
    config = MergeConfiguration.model_validate(yaml.safe_load(Path(config_file).read_text()))
    profile = cProfile.Profile()
    t = time.perf_counter()
    profile.enable()
    run_merge(config, out, MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    profile.disable()
    phases["run_merge"] = time.perf_counter() - t
    phases["top_tottime"] = _top(profile)
    return phases


def main(argv: list[str]) -> None:
    side, base, models, out, config_file = argv
    result = ours(base, models.split(","), out) if side == "ours" else peer(out, config_file)
    print(TAG + json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

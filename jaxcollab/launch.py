"""Run an experiment config: every strategy of a setting, round by round, then results.json and the report.

    jaxcollab launch --config=semi [--config.KEY=VALUE ...] [--workdir=DIR]
    jaxcollab launch --config=full:VARIANT --config.strategies=joint_lora,replay_lora
    python -m jaxcollab.launch --config=configs/semi.py:smollm2      # a config file, by path

--config names a packaged config (semi or full, then :variant) or a config file with get_config(variant).

Writes DIR/results.json (score matrices and measures per strategy), DIR/report.md and DIR/*.png, and
prints `results: DIR/results.json` as its last line. The workdir keeps every trained model, checkpoint and
score, so running the same command again after an interruption finishes the job without redoing work.
Under several processes (jax.distributed, started from the environment) only process 0 writes reports.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from jaxcollab.cli import HELP_ARGS
from jaxcollab.configs import resolve as resolve_config

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: semi or full (packaged), or a config file, then :variant; e.g. semi:smollm2.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<setting>-<variant>).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan (each strategy's model per round; every training"
                             " to run, resume or reuse, with steps and tokens) and stop: nothing is trained.")

_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)(=.*)?$")


def _load_config_file(spec: str) -> ConfigDict:
    path, _, variant = resolve_config(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("_experiment_config", path)
    if module_spec is None or module_spec.loader is None or not Path(path).is_file():
        raise FileNotFoundError(f"--config={spec}: {path} is not a config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def check_overrides(argv: Sequence[str]) -> str | None:
    """An error message for the first `--config.KEY` that names no key of the config (None if all do).

    ml_collections would fail too, with a traceback; this names the key and lists the valid ones.
    """
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return "--config is required, e.g. --config=semi or --config=configs/semi.py:smollm2"
    try:
        config = _load_config_file(spec)
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if not match:
            continue
        node, walked = config, []
        for part in match.group(1).split("."):
            if not isinstance(node, ConfigDict) or part not in node:
                where = ".".join(walked) or "the config"
                valid = ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else "(none: a value)"
                return f"unknown config key '{match.group(1)}': {where} has no '{part}'; valid keys there: {valid}"
            node = node[part]
            walked.append(part)
    return None


def _summary_line(name: str, s: dict) -> str:
    def fmt(values: list) -> str:
        value = values[-1] if values else None
        return "  –  " if value is None else f"{value:.3f}"

    return (f"{name:>16}: new {fmt(s['new'])}  recent {fmt(s['recent'])}  old {fmt(s['old'])}"
            f"  OP {fmt(s['op'])}  BWT {fmt(s['bwt'])}  ({s['seconds']:.0f}s)")


def run(config: ConfigDict, workdir: str | Path | None = None, dry_run: bool = False) -> Path | None:
    """Run the experiment `config` describes; write results.json, report.md and plots; return results.json.
    With `dry_run`, print the plan instead (nothing trained or scored) and return None.

    Raises `ExperimentConfigError` for a config that cannot run. Call `maybe_initialize_distributed()`
    first in a multi-process job.
    """
    import jax
    from tqdm.auto import tqdm

    from jaxcollab.atomic import atomic_file
    from jaxcollab.experiments import Runner, plan_experiment, run_experiment, strategy_names, validate
    from jaxcollab.provenance import provenance
    from jaxcollab.report import write_report

    validate(config)
    workdir = Path(workdir or f"runs/{config.setting}-{config.variant}")
    if dry_run:
        print("\n".join(plan_experiment(Runner(config, workdir, dry_run=True))))
        return None
    writer = jax.process_index() == 0
    if writer:
        workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(config, workdir)
    names = strategy_names(config)
    print(f"{config.setting}-collaborative setting, variant {config.variant}: {runner.num_rounds} rounds "
          f"({', '.join(t.name for t in runner.tasks)}); strategies: {', '.join(names)}; workdir {workdir}")
    bars: dict[str, tqdm] = {}

    def on_round(name: str, j: int) -> None:
        if name not in bars:
            bars[name] = tqdm(total=runner.num_rounds, desc=name, unit="round", disable=not config.progress,
                              leave=False)
        bars[name].update(1)

    def on_strategy(name: str, s: dict) -> None:
        if name in bars:
            bars.pop(name).close()
        tqdm.write(_summary_line(name, s))

    started = time.perf_counter()
    results = run_experiment(runner, on_strategy=on_strategy, on_round=on_round)
    results["provenance"] = {**provenance(), "wall_seconds": time.perf_counter() - started}
    path = workdir / "results.json"
    if writer:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(results, indent=1) + "\n")
        write_report(results, workdir)
    return path


def _main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {list(argv[1:])}", file=sys.stderr)
        return 2
    from absl import logging as absl_logging

    from jaxcollab.cli import enable_compilation_cache
    from jaxcollab.data import DataError
    from jaxcollab.model import CheckpointError, ConfigError
    from jaxcollab.model.sharding import maybe_initialize_distributed

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every checkpoint step at INFO
    maybe_initialize_distributed()
    enable_compilation_cache()
    logging.getLogger("jaxcollab").setLevel(logging.WARNING)
    try:
        path = run(_CONFIG.value, _WORKDIR.value, dry_run=_DRY_RUN.value)
    except (ValueError, DataError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if path is not None:
        print(f"results: {path}")
    return 0


def main() -> None:
    sys.argv = [f"--config={resolve_config(a.split('=', 1)[1])}" if a.startswith("--config=") else a
                for a in sys.argv]
    if any(arg in HELP_ARGS for arg in sys.argv[1:]):
        from jaxcollab.cli import run_absl_command

        run_absl_command(__doc__, _main)  # prints the help and exits 0
    error = check_overrides(sys.argv[1:])
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    app.run(_main)


if __name__ == "__main__":
    main()

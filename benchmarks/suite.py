"""The command line of `benchmarks/run.py`: which benchmarks a suite has, running them, printing and saving.

    python benchmarks/run.py --suite=cpu [--only=NAME[,NAME]] [--tiny] [--repeats=N] [--json=PATH]
    python benchmarks/run.py --suite=gpu [--reduced]

Prints one `RESULT <name> ours=<v> peer=<v> unit=<u> ratio=<peer time / our time>` line per figure, with
`DETAIL` lines (shapes, dtype, steps, phases, versions) and `CHECK <name> <what>=pass|FAIL` lines for the
equality checks. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import FAIL, Options, Result

Bench = Callable[[Options], list[Result]]


def _train(kind: str) -> Bench:
    def bench(opts: Options) -> list[Result]:
        from benchmarks import bench_train

        return [bench_train.run(opts, kind)]

    return bench


def _generate(opts: Options) -> list[Result]:
    from benchmarks import bench_generate

    return [bench_generate.run(opts)]


def _merge(opts: Options) -> list[Result]:
    from benchmarks import bench_merge

    return bench_merge.run(opts)


def _load(opts: Options) -> list[Result]:
    from benchmarks import bench_load

    return bench_load.run(opts)


BENCHMARKS: dict[str, tuple[tuple[str, ...], Bench]] = {
    "train_step_lora": (("cpu", "gpu"), _train("lora")),
    "train_step_fft": (("cpu", "gpu"), _train("fft")),
    "generate": (("cpu",), _generate),
    "merge_ties": (("cpu",), _merge),
    "load": (("cpu",), _load),
}


def parse(argv: list[str]) -> tuple[Options, list[str], Path | None]:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=("cpu", "gpu"), required=True)
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: the whole suite)")
    parser.add_argument("--tiny", action="store_true", help="shrink every shape to seconds (tests)")
    parser.add_argument("--reduced", action="store_true", help="gpu suite on a reduced shape, runnable on a CPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per side; figures are medians")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch CPU threads (default: every core, as JAX uses)")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "jaxcollab-bench",
                        help="generated checkpoints (reused between runs) and scratch outputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--loss-chunk", type=int, default=None,
                        help="training: positions per chunk of our LM head + loss, 0 for the whole logits "
                             "(default: 256 on the gpu suite, 0 on the cpu suite)")
    args = parser.parse_args(argv)
    suite_names = [n for n, (suites, _) in BENCHMARKS.items() if args.suite in suites]
    names = [n.strip() for n in args.only.split(",") if n.strip()] or suite_names
    unknown = [n for n in names if n not in suite_names]
    if unknown:
        parser.error(f"--only: {unknown} not in the {args.suite} suite; choose from {suite_names}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.loss_chunk is not None and args.loss_chunk < 0:
        parser.error("--loss-chunk must be >= 0")
    opts = Options(suite=args.suite, tiny=args.tiny, reduced=args.reduced, repeats=args.repeats,
                   workdir=args.workdir.absolute(), threads=args.threads, loss_chunk=args.loss_chunk)
    return opts, names, args.json


def main(argv: list[str] | None = None) -> int:
    opts, names, json_path = parse(sys.argv[1:] if argv is None else argv)
    if opts.suite == "gpu":  # this process must not take the accelerator's memory from the children
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    opts.workdir.mkdir(parents=True, exist_ok=True)
    from benchmarks.common import environment_lines

    env_lines = environment_lines(opts)
    print("\n".join(env_lines), flush=True)
    results: list[Result] = []
    for name in names:
        start = time.perf_counter()
        for result in BENCHMARKS[name][1](opts):
            results.append(result)
            print("\n".join(result.lines()), flush=True)
        print(f"DETAIL {name} benchmark_wall_s={time.perf_counter() - start:.1f}", flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps({"environment": env_lines, "suite": opts.suite, "tiny": opts.tiny,
                                         "reduced": opts.reduced, "results": [r.to_json() for r in results]},
                                        indent=2) + "\n")
    failed = [f"{r.name}:{c}" for r in results for c, ok in r.checks.items() if not ok]
    if failed:
        print(f"CHECKS {FAIL}: {', '.join(failed)}", flush=True)
        return 1
    return 0

"""Run a benchmark suite: `python benchmarks/run.py --suite=cpu|gpu [--only=NAME,...] [--tiny] [--reduced]`.

See `benchmarks/suite.py` for the options and the output format, and RESULTS.md for the figures.
"""

import sys
from pathlib import Path


def _main() -> int:
    here = Path(__file__).resolve().parent
    # Import the benchmarks as the package `benchmarks`, never their modules as top-level names.
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != here]
    from benchmarks.suite import main

    return main()


if __name__ == "__main__":
    sys.exit(_main())

"""What the command lines (`jaxcollab.merge`, `jaxcollab.mix`) share: usage errors, input and output checks,
and one way to run a command: exit 2 for a bad call, 1 for inputs that cannot be used, 0 and a one-line
summary on success; messages without tracebacks."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from absl import logging


class UsageError(ValueError):
    """Command-line arguments that do not describe a job."""


def check_output_dir(out: str | None, overwrite: bool) -> None:
    """--out must be given, and new or empty unless --overwrite."""
    if not out:
        raise UsageError("--out is required: the output model directory")
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise UsageError(f"--out={path} exists and is not empty; choose a new directory or pass --overwrite")


def check_input_dirs(paths: Iterable[str]) -> None:
    for path in paths:
        if not Path(path).is_dir():
            raise UsageError(f"{path}: no such directory")


def run_command(argv: Sequence[str], make_args: Callable[[], Any], run: Callable[[Any], str],
                input_errors: tuple[type[Exception], ...]) -> int:
    """Build the arguments and run; print the summary, or the error, and return the exit code."""
    if len(argv) > 1:
        print(f"error: unexpected arguments {list(argv[1:])}; see --help", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.WARNING)
    try:
        summary = run(make_args())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (*input_errors, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 0

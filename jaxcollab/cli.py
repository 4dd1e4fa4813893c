"""What the command lines (`jaxcollab.merge`, `jaxcollab.mix`, `jaxcollab.launch`) share: usage errors,
input and output checks, the on-disk cache of compiled programs, and one way to run a command: exit 2 for
a bad call, 1 for inputs that cannot be used, 0 and a one-line summary on success; messages without
tracebacks."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from absl import logging

DTYPES = ("float32", "bfloat16")  # what the commands load and save models in (--dtype)


class UsageError(ValueError):
    """Command-line arguments that do not describe a job."""


def check_output_dir(out: str | None, overwrite: bool) -> None:
    """--out must be given, and new or empty unless --overwrite."""
    if not out:
        raise UsageError("--out is required: the output model directory")
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise UsageError(f"--out={path} exists and is not empty; choose a new directory or pass --overwrite")


HELP_ARGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")


def run_absl_command(doc: str | None, main: Callable[[list[str]], int]) -> None:
    """Run an absl command's `main`, answering -h/--help with its description and flags (exit 0).

    absl's own --help exits 1 and lists every library's flags; this prints the command's docstring and the
    flags the command itself defines.
    """
    from absl import app, flags

    if any(arg in HELP_ARGS for arg in sys.argv[1:]):
        print((doc or "").strip())
        for module, module_flags in sorted(flags.FLAGS.flags_by_module_dict().items()):
            if "jaxcollab" not in module:  # absl's own flags
                continue
            print("\nflags:")
            for flag in sorted(module_flags, key=lambda f: f.name):
                default = "" if flag.default in (None, "") else f" (default: {flag.default_as_str})"
                print(f"  --{flag.name}: {flag.help}{default}")
        sys.exit(0)
    app.run(main)


def check_input_dirs(paths: Iterable[str]) -> None:
    for path in paths:
        if not Path(path).is_dir():
            raise UsageError(f"{path}: no such directory")


COMPILATION_CACHE_ENV = "JAXCOLLAB_COMPILATION_CACHE"
DEFAULT_COMPILATION_CACHE = Path("~/.cache/jaxcollab/xla")


def enable_compilation_cache() -> Path | None:
    """Keep compiled XLA programs on disk (JAX's persistent compilation cache), so that running a command
    again on the same shapes skips compiling: a merge's per-size programs, a training step after a restart.

    The directory is $JAXCOLLAB_COMPILATION_CACHE (default ~/.cache/jaxcollab/xla); "off" disables it. A
    cache directory configured for JAX already (JAX_COMPILATION_CACHE_DIR) is kept. Returns the directory.
    """
    import jax

    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    setting = os.environ.get(COMPILATION_CACHE_ENV, str(DEFAULT_COMPILATION_CACHE))
    if setting.strip().lower() in ("", "off", "0", "false", "none"):
        return None
    directory = Path(setting).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logging.warning("compilation cache disabled: cannot create %s (%s)", directory, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return directory


def run_command(argv: Sequence[str], make_args: Callable[[], Any], run: Callable[[Any], str],
                input_errors: tuple[type[Exception], ...]) -> int:
    """Build the arguments and run; print the summary, or the error, and return the exit code."""
    if len(argv) > 1:
        print(f"error: unexpected arguments {list(argv[1:])}; see --help", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()
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

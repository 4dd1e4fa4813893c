"""What every benchmark shares: the result record and its printed lines, options, alternating timed repeats,
child processes with their peak memory, page-cache control, compile counting and the environment."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PASS, FAIL = "pass", "FAIL"


@dataclasses.dataclass(frozen=True)
class Options:
    """Command-line settings every benchmark reads."""

    suite: str  # "cpu" or "gpu"
    tiny: bool  # shapes shrunk to seconds (tests)
    reduced: bool  # the gpu suite on a reduced shape (runs on CPU)
    repeats: int  # timed repeats per side; figures are medians
    workdir: Path  # generated checkpoints (kept between runs) and scratch outputs
    threads: int  # CPU threads of the torch side (JAX uses every core it sees)
    loss_chunk: int | None = None  # training: ours' TrainConfig.loss_chunk (None: the suite's setting)


@dataclasses.dataclass
class Result:
    """One side-by-side figure.

    `ratio` is always peer time / our time (higher is better): ours / peer for a throughput (`lower_is_better`
    false), peer / ours for a time or a memory size. `checks` are equality checks that must pass (name ->
    passed); `details` are free-form `key=value` lines (shapes, dtype, steps, phases, versions).
    """

    name: str
    ours: float
    peer: float
    unit: str
    lower_is_better: bool = False
    peer_name: str = ""
    details: list[str] = dataclasses.field(default_factory=list)
    checks: dict[str, bool] = dataclasses.field(default_factory=dict)
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    @property
    def ratio(self) -> float:
        num, den = (self.peer, self.ours) if self.lower_is_better else (self.ours, self.peer)
        return num / den if den else math.inf

    def lines(self) -> list[str]:
        out = [f"RESULT {self.name} ours={fmt(self.ours)} peer={fmt(self.peer)} unit={self.unit} "
               f"ratio={fmt(self.ratio)}"]
        if self.peer_name:
            out.append(f"DETAIL {self.name} peer={self.peer_name}")
        out += [f"DETAIL {self.name} {line}" for line in self.details]
        for side, values in self.samples.items():
            out.append(f"DETAIL {self.name} samples_{side}=[{', '.join(fmt(v) for v in values)}]")
        out += [f"CHECK {self.name} {check}={PASS if ok else FAIL}" for check, ok in self.checks.items()]
        return out

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ours": self.ours, "peer": self.peer, "unit": self.unit, "ratio": self.ratio,
                "peer_name": self.peer_name, "details": self.details, "checks": self.checks,
                "samples": self.samples}


def fmt(value: float) -> str:
    """About four significant digits, never in exponent notation."""
    if not math.isfinite(value) or value == 0:
        return str(value)
    digits = max(0, 3 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{digits}f}"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def alternate(ours: Callable[[], float], peer: Callable[[], float], repeats: int) -> tuple[list[float], list[float]]:
    """Run `ours` and `peer` in turn `repeats` times, so that both see the same background load."""
    a, b = [], []
    for _ in range(repeats):
        a.append(ours())
        b.append(peer())
    return a, b


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


# ------------------------------------------------------------------------------------------- child processes
@dataclasses.dataclass(frozen=True)
class ChildRun:
    """A finished child process: wall time, peak RSS and peak anonymous RSS, polled from /proc."""

    wall_s: float
    peak_rss: int  # bytes: VmHWM, the kernel's high-water mark (includes resident memory-mapped file pages)
    peak_anon: int  # bytes: largest RssAnon seen (anonymous memory only)
    returncode: int
    stdout: str
    stderr: str


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _status_bytes(status: bytes, field: bytes) -> int:
    for line in status.splitlines():
        if line.startswith(field + b":"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path = ROOT,
              poll_s: float = 0.005, timeout_s: float = 1800) -> ChildRun:
    """Run `cmd` and follow its memory from /proc every `poll_s`.

    VmHWM is monotonic, so polling loses at most the growth of the last interval. Readings count only once
    the child has exec'd (its command line is no longer ours): before that it shares or copies this
    process's memory, and the kernel's ru_maxrss of a child keeps that pre-exec size too, so it is not used.
    """
    own_cmdline = _read("/proc/self/cmdline")
    out_path, err_path = (Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{os.getpid()}-{n}" for n in "oe")
    with out_path.open("w") as out, err_path.open("w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=err)
        peaks = {"hwm": 0, "anon": 0}
        stop = threading.Event()

        def poll() -> None:
            exec_done = False
            while not stop.is_set():
                exec_done = exec_done or _read(f"/proc/{proc.pid}/cmdline") not in (own_cmdline, b"")
                if exec_done:
                    status = _read(f"/proc/{proc.pid}/status")
                    peaks["hwm"] = max(peaks["hwm"], _status_bytes(status, b"VmHWM"))
                    peaks["anon"] = max(peaks["anon"], _status_bytes(status, b"RssAnon"))
                stop.wait(poll_s)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            stop.set()
            poller.join()
        wall = time.perf_counter() - start
    stdout, stderr = out_path.read_text(), err_path.read_text()
    out_path.unlink()
    err_path.unlink()
    return ChildRun(wall, peaks["hwm"], peaks["anon"], proc.returncode, stdout, stderr)


def python_env(threads: int | None = None) -> dict[str, str]:
    """The environment of a benchmark child: this one, minus virtual-device flags, repo on the path."""
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f)
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# ---------------------------------------------------------------------------------------------- page cache
def evict_page_cache(paths: Iterable[Path]) -> None:
    """Drop the files' pages from this machine's page cache (posix_fadvise DONTNEED; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths: Iterable[Path], chunk: int = 64 << 20) -> int:
    """Read every byte of the files into one reused buffer; return the byte count."""
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


# ------------------------------------------------------------------------------------------------- compiles
class CompileCounter:
    """Counts XLA compilations and their time (tracing, lowering, backend compile) from jax.monitoring."""

    _installed = False
    _events: dict[str, list[float]] = {}

    def __init__(self) -> None:
        if not CompileCounter._installed:
            import jax.monitoring

            def listen(key: str, seconds: float, **_: Any) -> None:
                if key.startswith("/jax/core/compile/"):
                    CompileCounter._events.setdefault(key.rsplit("/", 1)[-1], []).append(seconds)

            jax.monitoring.register_event_duration_secs_listener(listen)
            CompileCounter._installed = True
        self._start = {k: len(v) for k, v in CompileCounter._events.items()}

    def _new(self, key: str) -> list[float]:
        return CompileCounter._events.get(key, [])[self._start.get(key, 0):]

    @property
    def compiles(self) -> int:
        return len(self._new("backend_compile_duration"))

    @property
    def seconds(self) -> float:
        return sum(sum(self._new(k)) for k in ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration",
                                                "backend_compile_duration"))

    def summary(self) -> str:
        return f"compiles={self.compiles} compile_s={self.seconds:.2f}"


# ---------------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft", "mergekit",
                    "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def environment_lines(opts: Options) -> list[str]:
    import jax

    devices = jax.devices()
    return [
        f"DETAIL env date={time.strftime('%Y-%m-%d')} cpu=\"{cpu_model()}\" cores={os.cpu_count()} "
        f"jax_devices={len(devices)}x{devices[0].device_kind.replace(' ', '_')} torch_threads={opts.threads}",
        "DETAIL env " + " ".join(f"{k}={v}" for k, v in versions().items()),
        f"DETAIL env command=\"{' '.join([Path(sys.executable).name, *sys.argv])}\"",
    ]


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20

"""load: `jaxcollab.model.load_hf` against a raw read of the same safetensors files, from a cold page cache.

Two figures, on a sharded bfloat16 checkpoint of a few GB laid out like Llama 3 (made once with transformers
`save_pretrained(max_shard_size=...)`):

- `load`: GB/s of `load_hf` (until every array is ready) against reading every byte of the files into one
  reused buffer. Both start from a cold page cache (the files' pages are dropped before every run), sides
  alternating; the raw read is the ceiling of what the disk gives. The reference `safetensors` library
  loading every shard (into new arrays) is reported beside them.
- `load_host_overhead`: the host memory the load needs beyond the parameters it returns, against the largest
  shard. On a CPU the loaded arrays live in host memory, where on an accelerator they would sit in device
  memory; so the figure is the rise of the loading process's peak RSS during the load minus the bytes of the
  loaded arrays (peak RSS is reset just before the load through /proc/self/clear_refs). A loader that
  mapped or read whole files would show at least a shard here.

Each load runs in a fresh child process (`python -m benchmarks.bench_load PATH`), so no run inherits
another's allocations or compiled code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.checkpoints import hf_checkpoint, safetensors_files
from benchmarks.common import Options, Result, alternate, evict_page_cache, median, mib, python_env, read_all, run_child
from benchmarks.shapes import TINY, ModelShape

CHILD_TAG = "LOAD_JSON "
ALLOWED_OVERHEAD = 1.2  # acceptance: peak host memory beyond the parameters <= 1.2 x the largest shard

# Llama 3's proportions (vocab, head_dim 128, GQA 4:1, FFN 3.5 x hidden) at 1.4B parameters: 2.8 GB in bfloat16.
LOAD_SHAPE = ModelShape(vocab=128256, hidden=2048, intermediate=7168, layers=16, heads=16, kv_heads=4, head_dim=128,
                        llama3_rope=True)


@dataclasses.dataclass(frozen=True)
class LoadSetting:
    shape: ModelShape
    dtype: str
    max_shard_size: str


def setting(opts: Options) -> LoadSetting:
    if opts.tiny:
        return LoadSetting(TINY, "bfloat16", "100KB")
    return LoadSetting(LOAD_SHAPE, "bfloat16", "1GB")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_main(path: str) -> None:
    """Load `path` once and print the load time and this process's memory around it."""
    import jax

    from jaxcollab import model

    jax.devices()  # backend start-up happens before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    _, params = model.load_hf(path, dtype="bfloat16")
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    print(CHILD_TAG + json.dumps({"load_s": seconds, "baseline_rss": baseline, "peak_rss": peak,
                                  "param_bytes": param_bytes, "after_rss": _status_kib("VmRSS") * 1024}), flush=True)


def _load_once(path: Path, files: list[Path]) -> dict:
    evict_page_cache(files)
    run = run_child([sys.executable, "-m", "benchmarks.bench_load", str(path)], env=python_env())
    if run.returncode != 0:
        raise RuntimeError(f"load child failed ({run.returncode}):\n{run.stderr[-4000:]}")
    line = next(x for x in run.stdout.splitlines() if x.startswith(CHILD_TAG))
    return json.loads(line[len(CHILD_TAG):])


def _raw_once(files: list[Path]) -> float:
    evict_page_cache(files)
    start = time.perf_counter()
    read_all(files)
    return time.perf_counter() - start


def _reference_library_once(files: list[Path]) -> float:
    """`safetensors.numpy.load_file` of every shard, one after the other (each into new host arrays)."""
    from safetensors.numpy import load_file

    evict_page_cache(files)
    start = time.perf_counter()
    for file in files:
        tensors = load_file(file)
        del tensors
    return time.perf_counter() - start


def run(opts: Options) -> list[Result]:
    st = setting(opts)
    path = hf_checkpoint(opts.workdir / f"load-{'tiny' if opts.tiny else opts.suite}", st.shape, dtype=st.dtype,
                         max_shard_size=st.max_shard_size)
    files = safetensors_files(path)
    total = sum(f.stat().st_size for f in files)
    largest = max(f.stat().st_size for f in files)
    loads: list[dict] = []

    def ours() -> float:
        loads.append(_load_once(path, files))
        return total / loads[-1]["load_s"] / 1e9

    a, b = alternate(ours, lambda: total / _raw_once(files) / 1e9, opts.repeats)
    reference = [total / _reference_library_once(files) / 1e9 for _ in range(opts.repeats)]
    overheads = [x["peak_rss"] - x["baseline_rss"] - x["param_bytes"] for x in loads]
    rises = [x["peak_rss"] - x["baseline_rss"] for x in loads]
    overhead = median(overheads)
    # At --tiny sizes the shards are kilobytes, below the allocator's own noise: nothing to check there.
    within = overhead <= ALLOWED_OVERHEAD * largest
    checks = {} if opts.tiny else {f"overhead_le_{ALLOWED_OVERHEAD}x_largest_shard": within}
    common = [
        f"model {st.shape.describe()} dtype={st.dtype} files={len(files)} total={mib(total):.0f}MiB "
        f"largest_shard={mib(largest):.0f}MiB (save_pretrained max_shard_size={st.max_shard_size})",
        f"page_cache=cold (posix_fadvise DONTNEED before every run) repeats={len(a)} (median) "
        f"devices=1 (parameters on the default device) cpu_count={os.cpu_count()}",
    ]
    speed = Result(
        "load", median(a), median(b), "GB/s", peer_name="raw read of the same files (64 MiB reused buffer)",
        details=[*common, f"ours_load_s={median([x['load_s'] for x in loads]):.2f} (load_hf until ready, "
                          "in a fresh process, imports excluded)",
                 f"safetensors.numpy.load_file_GB/s={median(reference):.3f} (every shard into new host arrays, "
                 "cold; the cost of placing the bytes in fresh memory, which the raw read's reused buffer avoids)"],
        samples={"ours": a, "peer": b},
    )
    memory = Result(
        "load_host_overhead", mib(overhead), mib(largest), "MiB", lower_is_better=True,
        peer_name="the largest shard",
        details=[*common,
                 f"peak_rss_rise_MiB={mib(median(rises)):.0f} loaded_params_MiB={mib(loads[0]['param_bytes']):.0f} "
                 f"overhead=rise-params; overhead/largest_shard={overhead / largest:.3f} "
                 f"(allowed {ALLOWED_OVERHEAD})"],
        checks=checks,
        samples={"ours": [mib(x) for x in overheads]},
    )
    return [speed, memory]


if __name__ == "__main__":
    child_main(sys.argv[1])

"""merge_ties: a TIES merge of four fine-tuned Llamas onto their base, Hugging Face directories in and out,
`python -m jaxcollab.merge --method=ties` against mergekit's `mergekit-yaml` with the equivalent config
(density, weight 1 each, normalize, int8_mask off, float32), both as the command a user runs: wall time and
peak RSS of each child process, on the same inputs with a warm page cache, sides alternating. The outputs
must agree entry by entry (within 1e-6 of the tensor's largest value) except where the top-k of a task
vector chose among magnitudes tied with its threshold: the libraries break such ties differently (both
keep exactly k), and task vectors of float weights have many equal magnitudes.

A second child per side times the phases: for jaxcollab imports, loading, merging (with compiles) and saving;
for mergekit imports and the merge, with the functions that take the most time under cProfile.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from benchmarks.checkpoints import fine_tuned_family, safetensors_files
from benchmarks.common import ChildRun, Options, Result, alternate, median, mib, python_env, read_all, run_child
from benchmarks.shapes import TINY, ModelShape

DENSITY = 0.2
N_MODELS = 4
NOISE = 0.002  # standard deviation of each fine-tuned model's change
TOLERANCE = 1e-6
PHASES_TAG = "PHASES_JSON "


@dataclasses.dataclass(frozen=True)
class MergeSetting:
    shape: ModelShape


MERGE_SMALL = ModelShape(vocab=32000, hidden=256, intermediate=704, layers=8, heads=8, kv_heads=4)


def setting(opts: Options) -> MergeSetting:
    return MergeSetting(TINY if opts.tiny else MERGE_SMALL)


def ours_command(base: Path, models: list[Path], out: Path) -> list[str]:
    return [sys.executable, "-m", "jaxcollab.merge", "--method=ties", f"--base={base}",
            f"--models={','.join(map(str, models))}", f"--weights={','.join(['1'] * len(models))}",
            f"--density={DENSITY}", "--dtype=float32", f"--out={out}"]


def mergekit_config(base: Path, models: list[Path]) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": DENSITY}} for m in models],
        "parameters": {"normalize": True, "int8_mask": False},
        "dtype": "float32",
    }


def peer_command(config_file: Path, out: Path) -> list[str]:
    script = Path(sys.executable).parent / "mergekit-yaml"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "mergekit.scripts.run_yaml"]
    return [*launcher, str(config_file), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def load_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for file in safetensors_files(directory):
        tensors.update(load_file(file))
    return tensors


@dataclasses.dataclass(frozen=True)
class Comparison:
    same_names: bool
    max_rel_err: float  # largest relative L2 error of a tensor
    worst_tensor: str
    differing: int  # entries that differ by more than TOLERANCE (relative to the tensor's largest value)
    differing_untied: int  # ... of which no model's task vector is tied with its top-k threshold
    total: int

    @property
    def equal(self) -> bool:
        return self.same_names and self.differing_untied == 0


def threshold_ties(base: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
    """Entries where some model's |task vector| equals its k-th largest (TIES keeps k = int(density * n)).

    There the top-k is a choice among equal magnitudes: jaxcollab keeps the lowest indices (as
    `jax.lax.top_k`), mergekit whatever `torch.argsort` returns first, and both keep exactly k.
    """
    tied = np.zeros(base.shape, bool)
    for model in models:
        magnitude = np.abs(model.astype(np.float32) - base.astype(np.float32)).reshape(-1)
        k = max(1, int(DENSITY * magnitude.size))
        kth = np.partition(magnitude, magnitude.size - k)[magnitude.size - k]
        tied |= (magnitude == kth).reshape(base.shape)
    return tied


def compare(ours: Path, peer: Path, base: Path, models: list[Path]) -> Comparison:
    """Our merged tensors against mergekit's: entry by entry, ties at the top-k threshold set apart."""
    a, b = load_tensors(ours), load_tensors(peer)
    if set(a) != set(b):
        return Comparison(False, float("inf"), f"only ours: {sorted(set(a) - set(b))[:3]} only peer: "
                                               f"{sorted(set(b) - set(a))[:3]}", 0, 0, 0)
    base_tensors, model_tensors = load_tensors(base), [load_tensors(m) for m in models]
    worst, worst_name, differing, untied, total = 0.0, "", 0, 0, 0
    for name, reference in b.items():
        got, ref = a[name].astype(np.float64), reference.astype(np.float64)
        if got.shape != ref.shape:
            return Comparison(True, float("inf"), name, ref.size, ref.size, ref.size)
        norm = np.linalg.norm(ref)
        err = np.linalg.norm(got - ref) / norm if norm else float(np.abs(got - ref).max())
        if err >= worst:
            worst, worst_name = err, name
        off = np.abs(got - ref) > TOLERANCE * max(float(np.abs(ref).max()), 1e-30)
        total += ref.size
        if off.any():
            differing += int(off.sum())
            untied += int((off & ~threshold_ties(base_tensors[name], [m[name] for m in model_tensors])).sum())
    return Comparison(True, worst, worst_name, differing, untied, total)


def _env(cache: Path) -> dict[str, str]:
    return {**python_env(), "JAXCOLLAB_COMPILATION_CACHE": str(cache)}


def _run(cmd: list[str], out: Path, cache: Path) -> ChildRun:
    if out.exists():
        shutil.rmtree(out)
    run = run_child(cmd, env=_env(cache))
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-4000:]}")
    return run


def run(opts: Options) -> list[Result]:
    st = setting(opts)
    root = opts.workdir / f"merge-{'tiny' if opts.tiny else opts.suite}"
    base, models = fine_tuned_family(root / "inputs", st.shape, N_MODELS, NOISE)
    config_file = root / "mergekit.yml"
    config_file.write_text(json.dumps(mergekit_config(base, models), indent=2))  # JSON is YAML
    out_ours, out_peer = root / "out-jaxcollab", root / "out-mergekit"
    inputs = [f for d in (base, *models) for f in safetensors_files(d)]
    input_bytes = read_all(inputs)  # warm page cache for both sides
    runs: dict[str, list[ChildRun]] = {"ours": [], "peer": []}
    cache = root / "xla-cache"  # jaxcollab's compilation cache, emptied so that the first run compiles
    shutil.rmtree(cache, ignore_errors=True)
    cold = {"ours": _run(ours_command(base, models, out_ours), out_ours, cache),
            "peer": _run(peer_command(config_file, out_peer), out_peer, cache)}

    def side(name: str, cmd: list[str], out: Path) -> float:
        runs[name].append(_run(cmd, out, cache))
        return runs[name][-1].wall_s

    a, b = alternate(lambda: side("ours", ours_command(base, models, out_ours), out_ours),
                     lambda: side("peer", peer_command(config_file, out_peer), out_peer), opts.repeats)
    result = compare(out_ours, out_peer, base, models)
    output_bytes = sum(f.stat().st_size for f in safetensors_files(out_ours))
    phases = {"ours": _phases("ours", base, models, root, config_file, cache),
              "peer": _phases("peer", base, models, root, config_file, cache)}
    rss = {k: median([r.peak_rss for r in v]) for k, v in runs.items()}
    anon = {k: median([r.peak_anon for r in v]) for k, v in runs.items()}
    common = [
        f"models base+{N_MODELS} {st.shape.describe()} float32 each={mib(input_bytes / (N_MODELS + 1)):.1f}MiB "
        f"inputs={mib(input_bytes):.1f}MiB output={mib(output_bytes):.1f}MiB",
        f"ties density={DENSITY} weights=1 normalize=true int8_mask=false sign=total dtype=float32 "
        f"repeats={len(a)} (median, after one first run per side) page_cache=warm",
        f"ours_command=\"python {' '.join(ours_command(base, models, out_ours)[1:])}\"",
        f"peer_command=\"mergekit-yaml {' '.join(peer_command(config_file, out_peer)[-5:])}\"",
    ]
    time_details = [
        *common,
        f"equal={result.equal} same_tensor_names={result.same_names} max_rel_err={result.max_rel_err:.3g} "
        f"({result.worst_tensor}) entries_differing={result.differing}/{result.total} of which "
        f"not_tied_at_a_topk_threshold={result.differing_untied}",
        f"first_run_s ours={cold['ours'].wall_s:.2f} (empty compilation cache: every merge program compiled) "
        f"peer={cold['peer'].wall_s:.2f}; ratio_first_run={cold['peer'].wall_s / cold['ours'].wall_s:.3f}; "
        "the repeats find the programs in jaxcollab's on-disk compilation cache",
        "ours_phases_s " + " ".join(f"{k}={v}" for k, v in phases["ours"].items()),
        "peer_phases_s " + " ".join(f"{k}={v}" for k, v in phases["peer"].items()),
    ]
    rss_details = [
        *common,
        f"peak_anon_MiB ours={mib(anon['ours']):.1f} peer={mib(anon['peer']):.1f} (polled RssAnon; peak RSS also "
        "counts resident pages of memory-mapped inputs)",
    ]
    mem_o, mem_p = mib(rss["ours"]), mib(rss["peer"])
    return [
        Result("merge_ties", median(a), median(b), "s", lower_is_better=True, peer_name="mergekit-yaml (mergekit)",
               details=time_details,
               checks={"same_tensor_names": result.same_names, "outputs_equal": result.equal},
               samples={"ours": a, "peer": b}),
        Result("merge_ties_peak_rss", mem_o, mem_p, "MiB", lower_is_better=True, peer_name="mergekit-yaml (mergekit)",
               details=rss_details, samples={"ours": [mib(r.peak_rss) for r in runs["ours"]],
                                              "peer": [mib(r.peak_rss) for r in runs["peer"]]}),
    ]


def _phases(side: str, base: Path, models: list[Path], root: Path, config_file: Path, cache: Path) -> dict[str, str]:
    out = root / f"phases-{side}"
    if out.exists():
        shutil.rmtree(out)
    args = [sys.executable, "-m", "benchmarks.merge_phases", side, str(base), ",".join(map(str, models)), str(out),
            str(config_file)]
    run = run_child(args, env=_env(cache))
    if run.returncode != 0:
        raise RuntimeError(f"merge phases ({side}) failed:\n{run.stderr[-4000:]}")
    shutil.rmtree(out, ignore_errors=True)
    line = next(x for x in run.stdout.splitlines() if x.startswith(PHASES_TAG))
    return json.loads(line[len(PHASES_TAG):])

"""`python -m jaxcollab.merge`: full-model and adapter merges end to end, and refusals that write nothing."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_hf_llama, rel_err
from test_merging import hf_state_dict, make_peft_adapters, peft_merged_state_dict

from jaxcollab import merging, model

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxcollab.merge", *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)


def torch_state_dict(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return {k: v.detach().numpy().copy() for k, v in loaded.state_dict().items()}


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_models")
    paths = [root / f"m{i}" for i in range(3)]
    for seed, path in enumerate(paths):
        build_hf_llama(path, seed=seed)
    return paths


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_merge_of_two_models_loads_in_transformers_and_equals_merging(three_models, tmp_path, method):
    """The file-to-file engine behind the command gives merging.merge's result (itself checked against
    mergekit), for any method of the registry."""
    base, m1, m2 = three_models
    out = tmp_path / "merged"
    result = run(f"--method={method}", f"--base={base}", f"--models={m1},{m2}", "--weights=1,0.5", "--density=0.3",
                 f"--out={out}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("merged 2 models") and method in lines[0]
    cfg, base_params = model.load_hf(base)
    expected = merging.merge(method, base_params, [model.load_hf(p)[1] for p in (m1, m2)], weights=[1, 0.5],
                             density=0.3)
    want = hf_state_dict(expected, cfg.num_layers)
    got = torch_state_dict(out)
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-7, atol=1e-7, err_msg=name)
    # and it is a real merge: different from the base and from each model
    untouched = hf_state_dict(base_params, cfg.num_layers)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert rel_err(got[name], untouched[name]) > 1e-2


def test_average_in_bfloat16_without_base(three_models, tmp_path):
    _, m1, m2 = three_models
    out = tmp_path / "avg"
    result = run("--method=average", f"--models={m1},{m2}", "--dtype=bfloat16", f"--out={out}")
    assert result.returncode == 0, result.stderr
    dtypes = set()
    for shard in out.glob("*.safetensors"):
        with open(shard, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes == {"BF16"}
    w1, w2 = (torch_state_dict(p)["model.layers.1.mlp.up_proj.weight"].astype(np.float64) for p in (m1, m2))
    got = torch_state_dict(out)["model.layers.1.mlp.up_proj.weight"]
    # inputs read in bf16 (half a step each), averaged in fp32, stored in bf16 (half a step): within one
    # bf16 step (2^(e-7)) of the larger input
    step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(w1), np.abs(w2)))) - 7)
    assert np.all(np.abs(got - (w1 + w2) / 2) <= step)
    assert rel_err(got, (w1 + w2) / 2) < 1e-2 and rel_err(got, w1) > 0.3


def test_adapters_equal_peft_add_weighted_adapter(tmp_path):
    base = tmp_path / "base"
    build_hf_llama(base, seed=0)
    adapters = make_peft_adapters(base, tmp_path)[:2]
    out = tmp_path / "merged"
    result = run("--method=ties", f"--base={base}", f"--adapters={adapters[0]},{adapters[1]}", "--weights=1,0.6",
                 "--density=0.5", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("merged 2 adapters")
    reference = peft_merged_state_dict(base, adapters, [1.0, 0.6], "ties", 0.5)
    got = torch_state_dict(out)
    assert set(got) == set(reference)
    for name, value in reference.items():
        assert rel_err(got[name], value) <= 1e-6, name


def test_bad_input_exits_nonzero_and_writes_nothing(three_models, tmp_path):
    base, m1, m2 = three_models
    wide = tmp_path / "wide"
    build_hf_llama(wide, seed=5, intermediate_size=64)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    cases = {
        "shapes": (["--method=ties", f"--base={base}", f"--models={m1},{wide}"],
                   r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(64, 32\) in models\[1\] \(.*wide\) "
                   r"but has shape \(48, 32\) in .*; models must have the same architecture"),
        "density0": (["--method=ties", f"--base={base}", f"--models={m1},{m2}", "--density=0"],
                     r"--density must be in \(0, 1\]"),
        "density1.5": (["--method=dare_ties", f"--base={base}", f"--models={m1},{m2}", "--density=1.5"],
                       r"--density must be in \(0, 1\]"),
        "method": (["--method=tie", f"--base={base}", f"--models={m1},{m2}"],
                   r"unknown method 'tie' for --models; valid: average, task_arithmetic, ties"),
        "no_models": (["--method=ties", f"--base={base}"], "nothing to merge"),
        "weights": (["--method=ties", f"--base={base}", f"--models={m1},{m2}", "--weights=1,2,3"],
                    "--weights has 3 values for 2 models"),
        "adapter_method": (["--method=average", f"--base={base}", f"--adapters={m1}"],
                           "unknown method 'average' for --adapters"),
        "not_adapter": (["--method=ties", f"--base={base}", f"--adapters={m1}"], "adapter_config.json not found"),
        "missing_dir": (["--method=ties", f"--base={base}", f"--models={m1},{tmp_path / 'nope'}"],
                        "no such directory"),
    }
    procs = {}
    for name, (args, _) in cases.items():
        out = tmp_path / f"out_{name}"
        procs[name] = (out, subprocess.Popen(cli(*args, f"--out={out}"), cwd=REPO, env=env(), text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    occupied_proc = subprocess.Popen(cli("--method=ties", f"--base={base}", f"--models={m1},{m2}",
                                         f"--out={occupied}"), cwd=REPO, env=env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode != 0, (name, stdout, stderr)
        assert re.search(cases[name][1], stderr), (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)
        assert nothing_written(out), name
    _, stderr = occupied_proc.communicate(timeout=300)
    assert occupied_proc.returncode != 0 and "exists and is not empty" in stderr
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]


def test_compiled_merges_are_kept_in_the_compilation_cache(three_models, tmp_path):
    base, m1, m2 = three_models
    cache = tmp_path / "xla"
    args = cli("--method=ties", f"--base={base}", f"--models={m1},{m2}")
    first = subprocess.run([*args, f"--out={tmp_path / 'a'}"], cwd=REPO, capture_output=True, text=True,
                           env={**env(), "JAXCOLLAB_COMPILATION_CACHE": str(cache)}, timeout=300)
    assert first.returncode == 0, first.stderr
    assert any("merge_leaf" in p.name for p in cache.iterdir()), sorted(p.name for p in cache.iterdir())
    off = subprocess.run([*args, f"--out={tmp_path / 'b'}"], cwd=REPO, capture_output=True, text=True,
                         env={**env(), "JAXCOLLAB_COMPILATION_CACHE": "off", "HOME": str(tmp_path / "home")},
                         timeout=300)
    assert off.returncode == 0, off.stderr
    assert not (tmp_path / "home").exists()  # nothing written to the default location either


def test_help_explains_both_semantics():
    result = run("--help")  # the module docstring and the command's own flags, exit 0
    assert result.returncode == 0 and "--density" in result.stdout and "--alsologtostderr" not in result.stdout
    text = result.stdout
    assert "full task vectors" in text and "mergekit" in text
    assert "LoRA factors merged separately" in text and "add_weighted_adapter" in text

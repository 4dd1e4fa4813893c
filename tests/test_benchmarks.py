"""The benchmark runner: its output format, its equality checks against the peers, its FLOP formula.

Speed itself is never asserted here; these runs use seconds-long shapes (`--tiny`, `--reduced`) to check that
every benchmark runs end to end and that its side-by-side outputs agree.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULT_LINE = re.compile(
    r"^RESULT (?P<name>\w+) ours=(?P<ours>[\d.]+) peer=(?P<peer>[\d.]+) unit=(?P<unit>\S+) ratio=(?P<ratio>[\d.]+)$"
)


def run_suite(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", *args, "--repeats=1", f"--workdir={tmp_path / 'work'}", f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def result_lines(stdout: str) -> dict[str, re.Match]:
    return {m["name"]: m for m in map(RESULT_LINE.match, stdout.splitlines()) if m}


def test_cpu_suite_tiny_generate_merge_load_agree_with_peers(tmp_path):
    proc, saved = run_suite(tmp_path, "--suite=cpu", "--tiny", "--only=generate,merge_ties,load")
    lines = result_lines(proc.stdout)
    assert set(lines) == {"generate", "merge_ties", "merge_ties_peak_rss", "load", "load_host_overhead"}
    # the equality checks ran and passed: same greedy tokens as transformers, same merged tensors as mergekit
    assert "CHECK generate same_tokens=pass" in proc.stdout
    # the decode floor measured on the model's own matmul shapes is reported
    assert re.search(r"DETAIL generate matmul_chain_ms_per_token=-?[0-9.]+ ", proc.stdout)
    assert "CHECK merge_ties outputs_equal=pass" in proc.stdout
    assert "CHECK merge_ties same_tensor_names=pass" in proc.stdout
    by_name = {r["name"]: r for r in saved["results"]}
    for name, match in lines.items():
        record = by_name[name]
        assert float(match["ratio"]) == pytest.approx(record["ratio"], rel=2e-3)
        assert record["ours"] > 0 and record["peer"] > 0
    # times and memory: ratio = peer / ours; throughputs: ours / peer
    merge = by_name["merge_ties"]
    assert merge["unit"] == "s" and merge["ratio"] == pytest.approx(merge["peer"] / merge["ours"])
    assert by_name["generate"]["ratio"] == pytest.approx(by_name["generate"]["ours"] / by_name["generate"]["peer"])
    assert saved["environment"][0].startswith("DETAIL env date=")


def test_cpu_suite_tiny_training_steps_start_from_the_same_loss(tmp_path):
    proc, saved = run_suite(tmp_path, "--suite=cpu", "--tiny", "--only=train_step_lora,train_step_fft")
    assert "CHECK train_step_lora same_initial_loss=pass" in proc.stdout
    assert "CHECK train_step_fft same_initial_loss=pass" in proc.stdout
    lora, fft = (next(r for r in saved["results"] if r["name"] == n) for n in ("train_step_lora", "train_step_fft"))
    trainable = {n: re.search(r"trainable ours=(\d+) peer=(\d+)", " ".join(r["details"])).groups()
                 for n, r in (("lora", lora), ("fft", fft))}
    # the same parameters train on both sides; LoRA trains far fewer than full fine-tuning
    assert trainable["lora"][0] == trainable["lora"][1] and trainable["fft"][0] == trainable["fft"][1]
    assert int(trainable["lora"][0]) < int(trainable["fft"][0])


def test_gpu_suite_runs_on_cpu_at_the_reduced_shape(tmp_path):
    proc, saved = run_suite(tmp_path, "--suite=gpu", "--reduced", "--only=train_step_lora")
    (result,) = saved["results"]
    assert result["name"] == "train_step_lora" and result["unit"] == "tokens/s"
    details = " ".join(result["details"])
    assert "dtype=bfloat16 remat=full ours_loss_chunk=32" in details and "mfu ours=" in details


def test_unknown_benchmark_is_a_usage_error():
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--suite=gpu", "--only=merge_ties"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not in the gpu suite" in proc.stderr


def test_flop_count_by_hand():
    sys.path.insert(0, str(ROOT))
    from benchmarks.shapes import ModelShape

    shape = ModelShape(vocab=10, hidden=4, intermediate=6, layers=2, heads=2, kv_heads=1)  # head_dim 2
    # per layer: q 4x4, k 4x2, v 4x2, o 4x4 = 48; gate/up/down 3 * 4x6 = 72; head 4x10 = 40
    assert shape.matmul_params() == 2 * (48 + 72) + 40
    assert shape.num_params() == 280 + 40 + 2 * 2 * 4 + 4  # + embedding + two norms per layer + final norm
    # LoRA r=1: per layer (4+4) + (4+2) + (4+2) + (4+4) + 3 * (4+6) = 58
    assert shape.lora_params(1) == 2 * 58
    attention = 6 * 2 * 8 * 2 * 2  # 6 * layers * seq * heads * head_dim
    assert shape.train_flops_per_token(8, None) == 6 * 280 + attention
    assert shape.train_flops_per_token(8, 1) == 4 * 280 + 6 * 116 + attention

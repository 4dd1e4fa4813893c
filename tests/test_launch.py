"""The experiment runner end to end: config errors, a TRACE smoke run, resumption after a kill, reports."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from trace_root import TRACE_ROOT

from jaxcollab import launch
from jaxcollab.experiments import ExperimentConfigError, experiment_config, registry, validate

REPO = Path(__file__).resolve().parents[1]
SMALL = {  # a reduced embedded config: a small model, two rounds of 16 facts, few steps
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2, "data.num_rounds": 2,
    "data.facts_per_domain": 16, "base_train.epochs": 6, "base_train.warmup_steps": 2, "fft.epochs": 8,
    "lora.epochs": 8, "fft.checkpoint_every": 2, "lora.checkpoint_every": 2, "eval.batch_size": 16, "mesh.fsdp": 1,
    "progress": False,
}


def small_config(setting="semi", **changes):
    config = experiment_config(setting)
    for key, value in {**SMALL, **changes}.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def as_flags(setting="semi", **changes):
    return [f"--config={REPO / 'configs' / f'{setting}.py'}",
            *(f"--config.{k}={v}" for k, v in {**SMALL, **changes}.items())]


def launch_cmd(*args, worker=None):
    head = [sys.executable, str(Path(__file__).with_name("launch_worker.py")), worker] if worker else \
        [sys.executable, "-m", "jaxcollab.launch"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    return subprocess.run([*head, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def without_seconds(results):
    """results.json less what differs between two runs of the same work: timings and provenance."""
    out = json.loads(json.dumps(results))
    out.pop("provenance")
    for s in out["strategies"].values():
        s.pop("seconds")
    return out


# ------------------------------------------------------------------------------------------ config errors
def test_unknown_config_key_names_it_and_lists_the_valid_ones():
    error = launch.check_overrides([f"--config={REPO}/configs/semi.py", "--config.model.hiddn_size=3"])
    assert "unknown config key 'model.hiddn_size'" in error and "hidden_size" in error and "num_layers" in error
    error = launch.check_overrides([f"--config={REPO}/configs/semi.py", "--config.modle.x=3"])
    assert "the config has no 'modle'" in error and "model" in error and "strategies" in error
    assert launch.check_overrides([f"--config={REPO}/configs/semi.py", "--config.model.hidden_size=64"]) is None
    error = launch.check_overrides([f"--config={REPO}/configs/semi.py:huge"])
    assert "unknown config variant 'huge'" in error and "tiny_trace" in error
    result = launch_cmd(f"--config={REPO}/configs/full.py", "--config.replay.w_hits=0.2")
    assert result.returncode == 2 and "valid keys there: w_hist" in result.stderr


def test_unknown_strategy_lists_the_valid_ones():
    config = experiment_config("semi")
    config.strategies = "seq_lora,magic_merge"
    with pytest.raises(ExperimentConfigError, match=r"unknown strategy 'magic_merge'.*seq_fft, seq_lora"):
        validate(config)
    config = experiment_config("full")
    config.strategies = "seq_fft"
    with pytest.raises(ExperimentConfigError, match=r"'seq_fft' for the full setting; valid strategies: joint_fft"):
        validate(config)


def test_negative_loss_chunk_is_refused():
    config = experiment_config("semi")
    config.model.loss_chunk = -8
    with pytest.raises(ExperimentConfigError, match=r"config.model.loss_chunk=-8 must be >= 0"):
        validate(config)


def test_trace_variant_without_trace_root_fails_at_once(monkeypatch):
    monkeypatch.delenv("JAXCOLLAB_TRACE_ROOT", raising=False)
    config = experiment_config("semi", "tiny_trace")
    with pytest.raises(ExperimentConfigError, match=r"config.data.trace_root=''.*JAXCOLLAB_TRACE_ROOT"):
        validate(config)
    config = experiment_config("semi", "llama3_8b_trace")
    config.data.trace_root = str(TRACE_ROOT)
    config.model.path = ""
    with pytest.raises(ExperimentConfigError, match=r"config.model.path is empty.*pretrained model.*JAXCOLLAB_LLAMA3"):
        validate(config)


def test_olora_lambdas_expand_into_one_strategy_each():
    from jaxcollab.experiments import strategy_names

    config = experiment_config("semi")
    config.strategies = "seq_lora,olora"
    config.olora.lambdas = "0.1,0.5"
    assert strategy_names(config) == ["seq_lora", "olora_0.1", "olora_0.5"]
    assert set(experiment_config("semi").strategies.split(",")) == set(registry.registered("semi")) - {"moe_router"}
    assert experiment_config("full").strategies.split(",") == registry.registered("full")


# ----------------------------------------------------------------------------------------------- runs
@pytest.mark.skipif(not TRACE_ROOT.is_dir(), reason=f"no TRACE data at {TRACE_ROOT}")
def test_tiny_trace_runs_end_to_end(tmp_path):
    config = experiment_config("semi", "tiny_trace")
    config.data.trace_root = str(TRACE_ROOT)
    config.data.train_limit = 8
    config.eval.limit = 4
    config.eval.max_prompt_len = 256
    config.strategies = "seq_lora,avg_fft,moe_gateless"
    config.base_train.epochs = 1.0
    for section in (config.base_train, config.fft, config.lora):  # a few steps each: no warm-up
        section.warmup_steps = 0
    config.mesh.fsdp = 1
    config.progress = False
    path = launch.run(config, tmp_path)
    results = json.loads(path.read_text())
    assert results["setting"] == "semi" and results["tasks"] == ["C-STANCE", "FOMC", "Py150"]
    assert set(results["strategies"]) == {"seq_lora", "avg_fft", "moe_gateless"}
    for s in results["strategies"].values():
        assert len(s["R"]) == 4 and all(len(row) == 3 for row in s["R"])
        # Row 0 is the base on every task; row j has the tasks of rounds 1..j and nothing above the diagonal.
        assert all(v is not None for v in s["R"][0])
        for j, row in enumerate(s["R"][1:], start=1):
            assert all(v is not None for v in row[:j]) and all(v is None for v in row[j:])
        assert len(s["old"]) == 4 and len(s["new"]) == len(s["op"]) == len(s["bwt"]) == 3
        assert s["seconds"] > 0
    # The constant-answer baseline of each round, fitted on the 8 training rows, scored on the 4 test rows: for
    # the letter tasks the most frequent letter; for Py150 one of its training lines.
    for constant, name in zip(results["constant_answer"], results["tasks"], strict=True):
        rows = json.loads((TRACE_ROOT / name / "trace500" / "train.json").read_text())[:8]
        labels = [r["answer"].strip() for r in rows]
        assert constant["task"] == name and constant["answer"] in labels
        if name != "Py150":
            assert constant["answer"] == max(labels, key=labels.count)
        assert len(constant["items"]) == 4 and constant["score"] == sum(constant["items"]) / 4
    report_text = (tmp_path / "report.md").read_text()
    assert report_text.startswith("# Semi-collaborative setting: 3 rounds")
    assert "## Was each round's task learned?" in report_text and "| seq_lora | 3 | Py150 |" in report_text
    for png in ("knowledge.png", "R_matrices.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_killed_mid_round_and_rerun_gives_the_same_results(tmp_path):
    flags = as_flags(strategies="seq_fft,seq_lora,avg_fft")
    clean = launch_cmd(*flags, f"--workdir={tmp_path / 'clean'}")
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert clean.stdout.strip().splitlines()[-1] == f"results: {tmp_path / 'clean' / 'results.json'}"
    assert "seq_fft: new" in clean.stdout

    crashed = launch_cmd(*flags, f"--workdir={tmp_path / 'crashed'}", worker="seq_lora-r2:5")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert not (tmp_path / "crashed" / "results.json").exists()
    interrupted = list((tmp_path / "crashed" / "runs").glob("seq_lora-r2-*/checkpoints/*"))
    assert interrupted, "the killed training left no checkpoint to resume from"
    again = launch_cmd(*flags, f"--workdir={tmp_path / 'crashed'}")
    assert again.returncode == 0, again.stderr[-3000:]
    clean_results = json.loads((tmp_path / "clean" / "results.json").read_text())
    resumed_results = json.loads((tmp_path / "crashed" / "results.json").read_text())
    assert without_seconds(resumed_results) == without_seconds(clean_results)
    # Nothing finished before the kill was trained again: the first round's models were not rewritten.
    first = sorted((tmp_path / "crashed" / "models").glob("fft-task1-*"))
    assert len(first) == 1


def test_finished_work_is_never_redone(tmp_path, monkeypatch):
    config = small_config(strategies="seq_fft,avg_fft")
    first = json.loads(launch.run(config, tmp_path).read_text())
    from jaxcollab import train

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(train.Trainer, "fit", refuse)
    second = json.loads(launch.run(config, tmp_path).read_text())
    assert without_seconds(second) == without_seconds(first)


def test_full_setting_shares_round_one_with_the_semi_ingredients(tmp_path):
    semi = json.loads(launch.run(small_config(strategies="seq_fft"), tmp_path).read_text())
    full = json.loads(launch.run(small_config("full", strategies="joint_fft,replay_fft"), tmp_path).read_text())
    round_one = semi["strategies"]["seq_fft"]["models"][0]
    assert full["strategies"]["joint_fft"]["models"][0] == round_one == full["strategies"]["replay_fft"]["models"][0]
    assert full["strategies"]["joint_fft"]["models"][1] != full["strategies"]["replay_fft"]["models"][1]
    assert full["strategies"]["joint_fft"]["R"][1] == semi["strategies"]["seq_fft"]["R"][1]


def test_router_training_and_frozen_olora_with_several_lambdas(tmp_path):
    from jaxcollab import model

    config = small_config(strategies="moe_noisy,moe_router,olora")
    config.olora.mode = "frozen"
    config.olora.lambdas = "0.1,1"
    results = json.loads(launch.run(config, tmp_path).read_text())
    assert list(results["strategies"]) == ["moe_noisy", "moe_router", "olora_0.1", "olora_1"]
    routed_key = results["strategies"]["moe_router"]["models"][-1]
    noisy_key = results["strategies"]["moe_noisy"]["models"][-1]
    assert routed_key != noisy_key
    cfg, routed = model.load_hf(tmp_path / "models" / routed_key)
    assert cfg.num_experts == 2 and cfg.num_experts_per_tok == 2
    # Only the routers trained: the experts are the FFT ingredients' MLPs, bit for bit.
    ingredient = next((tmp_path / "models").glob("fft-task2-*"))
    _, expert = model.load_hf(ingredient)
    assert (routed["layers"]["mlp"]["up_proj"]["kernel"][:, 1] == expert["layers"]["mlp"]["up_proj"]["kernel"]).all()
    # Frozen o-LoRA keeps every round's adapter (and its A bank) beside the base.
    for name in ("olora_0.1", "olora_1"):
        last = tmp_path / "adapters" / results["strategies"][name]["models"][-1]
        assert (last / "adapter_model.safetensors").is_file() and (last / "olora_a_bank.safetensors").is_file()
    assert results["strategies"]["olora_0.1"]["models"][1] != results["strategies"]["olora_1"]["models"][1]
    assert results["strategies"]["olora_0.1"]["models"][0] == results["strategies"]["olora_1"]["models"][0]


PLUGIN = '''
from jaxcollab.experiments import strategy


@strategy("lora_from_base", setting="semi")
def lora_from_base(lab, j):
    """Round j: the base with one LoRA adapter trained on task j alone (the round's ingredient)."""
    return lab.train(lab.base(), lab.task(j), "lora", label=f"lora-task{j}")
'''


def test_a_strategy_from_a_module_outside_the_package(tmp_path):
    """--config.plugins imports the user's module; its registered strategy runs through the launcher and
    shares the built-in strategies' ingredients (same label, start and data: the same trained adapter)."""
    (tmp_path / "my_strategies.py").write_text(PLUGIN)
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    args = [sys.executable, "-m", "jaxcollab.launch", *as_flags(), "--config.plugins=my_strategies",
            "--config.strategies=seq_lora,avg_lora,lora_from_base", f"--workdir={workdir}"]

    def launch(*extra):
        done = subprocess.run([*args, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    plan = launch("--dry_run")
    assert not workdir.exists()  # a dry run trains and writes nothing
    # base, lora-task1, seq_lora r2, lora-task2 (avg_lora's and the plugin's round 2); avg_lora r2 is computed
    assert "trainings: 4 to run, 0 to resume, 0 reused; 1 models computed" in plan
    planned = {line.split(":")[0].strip(): [part.split()[1] for part in line.split(":", 1)[1].split(",")]
               for line in plan.splitlines() if line.startswith("  ") and ": r1 " in line}
    assert "reusing" not in launch()  # shared ingredients are trained once and not announced as reused
    strategies = json.loads((workdir / "results.json").read_text())["strategies"]
    assert planned == {name: s["models"] for name, s in strategies.items()}  # the plan named the run's models
    assert "trainings: 0 to run, 0 to resume, 4 reused" in launch("--dry_run")
    mine, seq, avg = strategies["lora_from_base"]["models"], strategies["seq_lora"]["models"], \
        strategies["avg_lora"]["models"]
    assert mine[0] == seq[0] == avg[0] and mine[0].startswith("lora-task1-")  # round 1: the shared ingredient
    assert mine[1].startswith("lora-task2-") and mine[1] != seq[1]
    assert len(list((workdir / "adapters").iterdir())) == 3  # lora-task1, lora-task2 (shared with avg), seq r2

    unknown = subprocess.run([sys.executable, "-m", "jaxcollab.launch", *as_flags(), "--config.plugins=not_there",
                              f"--workdir={workdir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert unknown.returncode == 2 and "config.plugins: cannot import 'not_there'" in unknown.stderr

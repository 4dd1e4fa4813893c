"""A real pretrained model through the experiment runner: guards against meaningless runs, and reduced
`smollm2` / `smollm2_trace` runs end to end (the PyPI GGUF converted once, chat template, MMLU measures)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
from trace_root import TRACE_ROOT

from jaxcollab import launch
from jaxcollab.experiments import ExperimentConfigError, Runner, experiment_config, validate

REPO = Path(__file__).resolve().parents[1]
REDUCED = {"data.num_rounds": 2, "data.facts_per_domain": 4, "lora.epochs": 1.0, "fft.epochs": 1.0,
           "eval.old_size": 8, "eval.old_text_size": 4, "mesh.fsdp": 1, "progress": False}


def configured(setting, variant, **changes):
    config = experiment_config(setting, variant)
    for key, value in {**REDUCED, **changes}.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


# ------------------------------------------------------------------------------------------------ guards
def test_guards_refuse_meaningless_pretrained_runs():
    config = experiment_config("semi", "smollm2")
    validate(config)
    config.data.tokenizer = "bytes"
    with pytest.raises(ExperimentConfigError, match="tokenizer=bytes with a pretrained model"):
        validate(config)
    config = experiment_config("semi", "smollm2")
    config.eval.old_task = "synthetic/old"
    with pytest.raises(ExperimentConfigError, match="a pretrained model never saw it"):
        validate(config)
    config = experiment_config("semi", "smollm2")
    config.lora.epochs = -1.0
    with pytest.raises(ExperimentConfigError, match=r"config.lora.epochs=-1.0 must be >= 0"):
        validate(config)
    config = experiment_config("semi", "smollm2")
    config.fft.learning_rate = math.inf
    with pytest.raises(ExperimentConfigError, match="config.fft.learning_rate=inf must be a positive finite"):
        validate(config)
    config = experiment_config("semi", "smollm2")
    config.model.path = "no/such-thing/here"
    with pytest.raises(ExperimentConfigError, match="neither an asset"):
        Runner(config, "/nonexistent-workdir")


def test_a_tokenizer_that_does_not_fit_and_a_warmup_past_the_end_are_refused(hf_llama, tmp_path):
    from test_data_tokenizers import build_tiny_hf_tokenizer

    tokenizer = build_tiny_hf_tokenizer(tmp_path / "tok")  # 300 ids
    small, _ = hf_llama()  # 64 ids
    config = configured("semi", "smollm2", **{"model.path": str(small), "data.tokenizer": str(tokenizer)})
    with pytest.raises(ExperimentConfigError, match=r"has 300 ids but the model only 64"):
        Runner(config, tmp_path / "w1")
    config = configured("semi", "smollm2", **{"model.path": str(small), "data.chat_template": "none"})
    with pytest.raises(ExperimentConfigError, match=r"has no tokenizer.*config.data.tokenizer=DIR"):
        Runner(config, tmp_path / "w2")
    fitting, _ = hf_llama(vocab_size=304)
    config = configured("semi", "smollm2", **{"model.path": str(fitting), "data.tokenizer": str(tokenizer),
                                               "strategies": "seq_lora", "lora.warmup_steps": 50, "eval.old": ""})
    with pytest.raises(ExperimentConfigError, match=r"config.lora.warmup_steps=50 but .* has only 1 steps"):
        launch.run(config, tmp_path / "w3")


def test_mmlu_known_is_refused_when_the_base_knows_no_mmlu(smollm2_gguf, tmp_path):
    # SmolLM2-135M-Instruct's MMLU accuracy is at chance: its confident answers are right about a quarter of
    # the time, so the questions it answers "with a clear margin" are luck, not knowledge.
    config = configured("semi", "smollm2", strategies="seq_lora", **{"eval.old": "mmlu_known",
                                                                     "eval.old_known_pool": 24})
    with pytest.raises(ExperimentConfigError, match=r"the base's MMLU answers are not knowledge: of 24 questions, "
                                                    r"\d+ answered with a lead of >= 1.0 nats.*not above chance"):
        launch.run(config, tmp_path)
    assert not list((tmp_path / "runs").glob("*")) and not list((tmp_path / "adapters").glob("*"))  # nothing trained


# ------------------------------------------------------------------------------------------------- runs
def check_old_measures(results, names=("mmlu_text", "mmlu_cloze")):
    strategies = results["strategies"]
    assert results["old_knowledge"] == list(names)
    bases = {name: [s["old_measures"][m]["value"][0] for m in results["old_knowledge"]]
             for name, s in strategies.items()}
    assert len({tuple(v) for v in bases.values()}) == 1  # one base, scored once on the same items
    for s in strategies.values():
        for m in s["old_measures"].values():
            for value, (low, high) in zip(m["value"], m["ci95"], strict=True):
                assert low <= value <= high
            assert m["change"][0] == 0.0 and len(m["per_item"][0]) == m["n"]
        assert s["old"] == s["old_measures"]["mmlu_text"]["value"] and s["old_ci95"] == s["old_measures"][
            "mmlu_text"]["ci95"]
        text = s["old_measures"]["mmlu_text"]
        assert text["chance"] == pytest.approx(-math.log(49152))  # the uniform distribution over the vocabulary
        assert text["ci95"][0][0] > text["chance"] + 5 and text["value"][0] < -1.0
        assert 0.0 <= s["old_measures"]["mmlu_cloze"]["value"][0] <= 1.0


@pytest.mark.slow
def test_smollm2_semi_reduced_end_to_end_and_resumable(smollm2_gguf, tmp_path, capsys, monkeypatch):
    from jaxcollab.evaluation import old_measures

    def informative(*args, **kwargs):  # the real selection, its confident answers counted as all right
        selection = old_measures.known_questions(*args, **kwargs)
        return dataclasses.replace(selection, confident=len(selection.positions))

    monkeypatch.setattr("jaxcollab.experiments.runner.known_questions", informative)
    config = configured("semi", "smollm2", strategies="seq_lora,avg_lora",
                        **{"eval.old": "mmlu_text,mmlu_cloze,mmlu_known", "eval.old_known_pool": 12,
                           "eval.old_known_margin": 0.05})
    results = json.loads(launch.run(config, tmp_path).read_text())
    out = capsys.readouterr().out
    assert "training lora-task1-" in out and "constant lr 0.002" in out and "trainable parameters" in out
    assert results["tasks"] == ["synthetic/round1", "synthetic/round2"]
    check_old_measures(results, ("mmlu_text", "mmlu_cloze", "mmlu_known"))
    for s in results["strategies"].values():  # every model scored on the base's known questions, the base right
        known = s["old_measures"]["mmlu_known"]
        assert known["value"][0] == 1.0 and known["n"] >= 1 and all(len(p) == known["n"] for p in known["per_item"])
        assert known["base_above_chance"] and s["old_measures"]["mmlu_text"]["base_above_chance"]
    # The base's first 8 pool questions are mmlu_cloze's 8: known ones among them are right in mmlu_cloze too.
    cloze_base = results["strategies"]["seq_lora"]["old_measures"]["mmlu_cloze"]["per_item"][0]
    base_scores = next((tmp_path / "scores").glob("base-*.json"))
    selection = next(v for k, v in json.loads(base_scores.read_text()).items() if k.startswith("known:pool=12:"))
    assert all(cloze_base[i] == 1.0 for i in selection["positions"] if i < 8)
    for s in results["strategies"].values():
        change = s["weight_change"]["from_base"]
        assert all(0.0 < c < 0.05 for c in change)  # real updates, small against the weights
        assert len(s["R_items"][-1][0]) == 4 and all(v in (0.0, 1.0) for v in s["R_items"][-1][0])
    assert results["strategies"]["seq_lora"]["weight_change"]["update"][0] == results["strategies"]["seq_lora"][
        "weight_change"]["from_base"][0]
    assert results["provenance"]["cpu"] and results["provenance"]["libraries"]["jax"]
    converted = list((tmp_path / "models").glob("base-gguf-*"))
    assert len(converted) == 1 and (converted[0] / "tokenizer.json").is_file()
    runner = Runner(config, tmp_path)
    prompt = runner.tasks[0].examples("test")[0]["prompt"]
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert not runner.tokenizer.add_bos and runner.tokenizer.eos_id == 2
    # run again: nothing is trained, converted or scored again, and the results are the same
    from jaxcollab import convert, train

    def refuse(*args, **kwargs):
        raise AssertionError("finished work was redone")

    monkeypatch.setattr(train.Trainer, "fit", refuse)
    monkeypatch.setattr(convert, "convert_gguf", refuse)
    monkeypatch.setattr("jaxcollab.experiments.runner.evaluate_old_knowledge", refuse)
    again = json.loads(launch.run(config, tmp_path).read_text())
    for name, s in again["strategies"].items():
        first = results["strategies"][name]
        assert {k: v for k, v in s.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}


@pytest.mark.slow
@pytest.mark.skipif(not TRACE_ROOT.is_dir(), reason=f"no TRACE data at {TRACE_ROOT}")
def test_smollm2_trace_full_reduced_end_to_end(smollm2_gguf, tmp_path):
    config = configured("full", "smollm2_trace", strategies="joint_lora,replay_lora",
                        **{"data.trace_root": str(TRACE_ROOT), "data.train_limit": 8, "eval.limit": 4})
    results = json.loads(launch.run(config, tmp_path).read_text())
    assert results["setting"] == "full" and results["tasks"] == ["Py150", "ScienceQA"]
    assert [c["task"] for c in results["constant_answer"]] == results["tasks"]
    assert "## Was each round's task learned?" in (tmp_path / "report.md").read_text()
    check_old_measures(results)
    joint, replay = results["strategies"]["joint_lora"], results["strategies"]["replay_lora"]
    assert joint["models"][0] == replay["models"][0]  # round 1 is the same LoRA fine-tuning
    assert joint["models"][1] != replay["models"][1]
    for s in (joint, replay):
        assert all(v is not None for v in s["R"][2]) and len(s["R_items"][2][0]) == 4

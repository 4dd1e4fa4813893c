"""Task registry: real TRACE files load with the row counts SOURCES.md lists, substitutes, MetaMath, bad input."""

import json
from pathlib import Path

import datasets
import pytest
from trace_root import TRACE_ROOT

from jaxcollab.data import tasks
from jaxcollab.data.tasks import (
    ALPACA_TEMPLATE,
    DataError,
    MissingDataError,
    get_task,
    list_tasks,
    read_trace_file,
)

needs_trace = pytest.mark.skipif(not TRACE_ROOT.is_dir(), reason=f"TRACE data not found at {TRACE_ROOT}")

# Row counts from SOURCES.md ("Quality caveats" and "Per-file listing"), for files that exist.
ROW_COUNTS = {
    ("C-STANCE", "trace500"): {"train": 500, "eval": 100, "test": 100},
    ("C-STANCE", "trace5000"): {"train": 5000, "eval": 2000, "test": 2000},
    ("C-STANCE", "trace1000"): {"train": 1000},
    ("C-STANCE", "reasoning"): {"train": 500, "test": 500},
    ("FOMC", "trace500"): {"train": 500, "eval": 100, "test": 100},
    ("FOMC", "trace5000"): {"train": 5000, "eval": 496, "test": 496},
    ("FOMC", "trace1000"): {"train": 1000},
    ("FOMC", "reasoning"): {"train": 500, "test": 496},
    ("MeetingBank", "trace500"): {"eval": 100, "test": 100},
    ("MeetingBank", "reasoning"): {"train": 376, "test": 235},
    ("Py150", "trace500"): {"train": 500, "eval": 100, "test": 100},
    ("Py150", "trace1000"): {"train": 1000},
    ("Py150", "reasoning"): {"train": 513, "test": 500},
    ("ScienceQA", "trace500"): {"train": 500, "eval": 100, "test": 100},
    ("ScienceQA", "trace5000"): {"eval": 2000, "test": 2000},
    ("ScienceQA", "trace1000"): {"train": 1000},
    ("ScienceQA", "reasoning"): {"train": 440, "test": 500},
    ("NumGLUE-cm", "trace500"): {"train": 500, "eval": 41, "test": 81},
    ("NumGLUE-cm", "trace5000"): {"train": 5000, "eval": 41, "test": 81},
    ("NumGLUE-cm", "trace1000"): {"train": 1000},
    ("NumGLUE-cm", "reasoning"): {"train": 500, "test": 81},
    ("NumGLUE-ds", "trace500"): {"train": 500, "eval": 100, "test": 100},
    ("NumGLUE-ds", "trace5000"): {"train": 5000, "eval": 164, "test": 325},
    ("NumGLUE-ds", "trace1000"): {"train": 1000},
    ("NumGLUE-ds", "reasoning"): {"train": 500, "test": 325},
    ("20Minuten", "trace500"): {"train": 500, "eval": 100, "test": 100},
    ("20Minuten", "trace5000"): {"eval": 200, "test": 200},
    ("20Minuten", "trace1000"): {"train": 1000},
    ("20Minuten", "reasoning"): {"train": 401, "test": 200},
}


@needs_trace
@pytest.mark.parametrize(("task", "variant"), sorted(ROW_COUNTS))
def test_trace_files_have_documented_row_counts(task, variant):
    for split, count in ROW_COUNTS[(task, variant)].items():
        rows = tasks.read_trace_split(TRACE_ROOT, task, variant, split, substitute_missing=False)
        assert len(rows) == count, (task, variant, split)
        assert all(set(row) == {"prompt", "answer"} for row in rows)


@needs_trace
def test_trace500_tasks_load_as_datasets_with_metric_and_budget():
    expected_metric = {"C-STANCE": "accuracy", "FOMC": "accuracy", "ScienceQA": "accuracy",
                       "MeetingBank": "rouge_l", "Py150": "edit_similarity", "20Minuten": "sari",
                       "NumGLUE-cm": "exact_match", "NumGLUE-ds": "exact_match"}
    for name, metric in expected_metric.items():
        task = get_task(name, root=TRACE_ROOT, variant="trace500")
        assert task.metric == metric
        test = task.load("test")
        assert isinstance(test, datasets.Dataset)
        assert test.column_names == ["prompt", "answer"]
        assert len(test) == ROW_COUNTS[(name, "trace500")]["test"]
    # Prompts are used as they are: the first FOMC train prompt is TRACE's text verbatim.
    fomc = get_task("FOMC", root=TRACE_ROOT).load("train")[0]
    raw = json.loads((TRACE_ROOT / "FOMC" / "trace500" / "train.json").read_text(encoding="utf-8"))[0]
    assert fomc == raw
    assert fomc["prompt"].startswith("What is the monetary policy stance for the following text?")
    assert get_task("FOMC", root=TRACE_ROOT).max_new_tokens < get_task("MeetingBank", root=TRACE_ROOT).max_new_tokens
    assert get_task("FOMC", root=TRACE_ROOT, variant="reasoning").max_new_tokens == 512


@needs_trace
def test_meetingbank_trace500_train_falls_back_to_stripped_reasoning_rows():
    task = get_task("MeetingBank", root=TRACE_ROOT, variant="trace500")
    train = task.examples("train")
    assert len(train) == 376
    raw = json.loads((TRACE_ROOT / "MeetingBank" / "reasoning" / "train.json").read_text(encoding="utf-8"))
    marker = "Therefore, the summary of the meeting transcripts is:\n"
    assert train[0]["answer"] == raw[0]["answer"].split(marker)[1]
    assert train[0]["answer"].startswith("A resolution approving a proposed Business Incentive Fund")
    for row in train:
        assert marker not in row["answer"]
        assert row["prompt"].startswith("Write a summary of the following meeting transcripts.\nMeeting transcripts:\n")
        assert row["prompt"].endswith("\nSummary:")
        assert "Reasoning:" not in row["prompt"][-30:]
    # The same prompt shape as the real trace500 test split.
    test = task.examples("test")[0]["prompt"]
    assert test.startswith("Write a summary of the following meeting transcripts.\nMeeting transcripts:\n")
    assert test.endswith("\nSummary:")
    with pytest.raises(MissingDataError, match=r"MeetingBank/trace500/train\.json.*substitute_missing=True"):
        get_task("MeetingBank", root=TRACE_ROOT, substitute_missing=False).load("train")


@needs_trace
def test_documented_substitutes_and_missing_files():
    assert len(get_task("Py150", root=TRACE_ROOT, variant="trace5000").load("train")) == 1000
    reasoning = get_task("FOMC", root=TRACE_ROOT, variant="reasoning")
    assert reasoning.examples("eval") == reasoning.examples("test")
    with pytest.raises(MissingDataError, match=r"trace1000.*eval_variant"):
        get_task("FOMC", root=TRACE_ROOT, variant="trace1000").load("test")
    mixed = get_task("FOMC", root=TRACE_ROOT, variant="trace1000", eval_variant="trace500")
    assert (len(mixed.load("train")), len(mixed.load("test"))) == (1000, 100)
    with pytest.raises(MissingDataError, match="Py150/trace5000"):
        get_task("Py150", root=TRACE_ROOT, variant="trace5000").load("test")


@needs_trace
def test_drop_test_overlap_removes_leaked_train_rows():
    # SOURCES.md: FOMC trace500 train has 500 rows, 496 unique, train∩test = 1 unique prompt.
    train = get_task("FOMC", root=TRACE_ROOT).examples("train")
    test_prompts = {row["prompt"] for row in get_task("FOMC", root=TRACE_ROOT).examples("test")}
    leaked = sum(row["prompt"] in test_prompts for row in train)
    assert len({row["prompt"] for row in train} & test_prompts) == 1
    clean = get_task("FOMC", root=TRACE_ROOT, drop_test_overlap=True).examples("train")
    assert len(clean) == 500 - leaked
    assert not any(row["prompt"] in test_prompts for row in clean)


@needs_trace
def test_lima_and_gsm8k_from_the_trace_copy():
    lima = get_task("Lima", root=TRACE_ROOT)
    assert [len(lima.load(s)) for s in ("train", "eval", "test")] == [1030, 300, 300]
    math = get_task("MetaMath", root=TRACE_ROOT)
    test = math.examples("test")
    assert len(test) == 1319
    first_query = ("Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                   "muffins for her friends every day with four. She sells the remainder at the farmers' market "
                   "daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' "
                   "market?")
    assert test[0]["prompt"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n" + first_query + "\n\n### Response: Let's think step by step.")
    assert test[0]["answer"] == "18"
    assert test[2]["answer"] == "70000"  # "#### 70000"
    assert math.metric == "gsm8k"
    plain = get_task("MetaMath", root=TRACE_ROOT, think_step_by_step=False).examples("test")[0]["prompt"]
    assert plain.endswith("### Response:")


def test_metamath_training_file_uses_the_alpaca_template(tmp_path):
    rows = [{"query": "What is 2+3?", "response": "2+3=5. The answer is: 5", "type": "GSM_AnsAug"},
            {"query": "What is 7*6?", "response": "7*6=42. The answer is: 42", "type": "GSM_Rephrased"}]
    jsonl = tmp_path / "MetaMathQA-2.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"query": "How many?", "response": "1,000+234=<<1000+234=1234>>1234\n#### 1,234"}),
                   encoding="utf-8")
    task = get_task("MetaMath", train_file=jsonl, gsm8k_file=gsm)
    train = task.examples("train")
    assert train[0] == {
        "prompt": "Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.\n\n### Instruction:\nWhat is 2+3?\n\n### Response:",
        "answer": "2+3=5. The answer is: 5",
    }
    assert train[1]["prompt"] == ALPACA_TEMPLATE.format(query="What is 7*6?")
    assert task.examples("test") == [{"prompt": ALPACA_TEMPLATE.format(query="How many?")
                                      + " Let's think step by step.", "answer": "1234"}]
    as_json = tmp_path / "train.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8")
    subset = get_task("MetaMath", train_file=as_json, gsm8k_file=gsm, train_subset=1).examples("train")
    assert len(subset) == 1 and subset[0] in train
    with pytest.raises(MissingDataError, match="train_file="):
        get_task("MetaMath", gsm8k_file=gsm).load("train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "response": "r"}) + "\n" + json.dumps({"query": "q"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: row .*1.*'response'"):
        get_task("MetaMath", train_file=bad, gsm8k_file=gsm).load("train")


# ------------------------------------------------------------------------------------------------ bad input


def _write_trace(root: Path, task: str, variant: str, split: str, content) -> Path:
    path = root / task / variant / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_file_that_is_not_a_list_is_an_error_naming_the_file(tmp_path):
    path = _write_trace(tmp_path, "FOMC", "trace500", "train", {"prompt": "p", "answer": "a"})
    with pytest.raises(DataError, match=rf"{path}: expected a JSON list.*got a JSON dict"):
        read_trace_file(path)


def test_row_without_answer_is_an_error_naming_file_and_row(tmp_path):
    path = _write_trace(tmp_path, "FOMC", "trace500", "train",
                        [{"prompt": "p0", "answer": "A"}, {"prompt": "p1", "answer": "B"}, {"prompt": "p2"}])
    with pytest.raises(DataError, match=rf"{path}: row 2: missing field 'answer'"):
        get_task("FOMC", root=tmp_path).load("train")


def test_non_string_fields_and_non_object_rows_are_errors(tmp_path):
    path = _write_trace(tmp_path, "FOMC", "trace500", "test", [{"prompt": "p", "answer": 3}])
    with pytest.raises(DataError, match=rf"{path}: row 0: field 'answer' must be a string, got int"):
        read_trace_file(path)
    path = _write_trace(tmp_path, "FOMC", "trace500", "eval", [{"prompt": None, "answer": "a"}])
    with pytest.raises(DataError, match=rf"{path}: row 0: field 'prompt' must be a string"):
        read_trace_file(path)
    path = _write_trace(tmp_path, "C-STANCE", "trace500", "test", [{"prompt": "p", "answer": "a"}, ["p", "a"]])
    with pytest.raises(DataError, match=rf"{path}: row 1: expected an object"):
        read_trace_file(path)


def test_empty_split_and_invalid_json_are_errors(tmp_path):
    path = _write_trace(tmp_path, "FOMC", "trace500", "test", [])
    with pytest.raises(DataError, match=rf"{path}: empty split"):
        get_task("FOMC", root=tmp_path).load("test")
    path = _write_trace(tmp_path, "FOMC", "trace500", "eval", '[{"prompt": "p", "answer": "a"},')
    with pytest.raises(DataError, match=rf"{path}: not valid JSON"):
        read_trace_file(path)


def test_missing_directories_and_files_are_errors(tmp_path):
    with pytest.raises(MissingDataError, match=r"TRACE root .*nowhere does not exist"):
        get_task("FOMC", root=tmp_path / "nowhere")
    with pytest.raises(MissingDataError, match=r"task directory .*FOMC does not exist"):
        get_task("FOMC", root=tmp_path).load("train")
    _write_trace(tmp_path, "FOMC", "trace500", "train", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(MissingDataError, match=r"directory .*FOMC/trace5000 does not exist.*\['trace500'\]"):
        get_task("FOMC", root=tmp_path, variant="trace5000").load("train")
    with pytest.raises(MissingDataError, match=r"FOMC/trace500/test\.json does not exist"):
        get_task("FOMC", root=tmp_path).load("test")
    assert isinstance(MissingDataError("x"), FileNotFoundError)


def test_registry_names_and_errors(tmp_path, monkeypatch):
    names = list_tasks()
    assert names[:8] == ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds",
                         "20Minuten"]
    assert {"Lima", "MetaMath", "synthetic/old", "synthetic/round4"} <= set(names)
    with pytest.raises(ValueError, match=r"unknown task 'fomc'; valid: C-STANCE, FOMC"):
        get_task("fomc")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['varient'\] for task 'FOMC'; valid: root, variant"):
        get_task("FOMC", root=tmp_path, varient="trace500")
    with pytest.raises(ValueError, match="unknown TRACE variant 'trace50'"):
        get_task("FOMC", root=tmp_path, variant="trace50")
    monkeypatch.delenv(tasks.ROOT_ENV, raising=False)
    with pytest.raises(MissingDataError, match=tasks.ROOT_ENV):
        get_task("FOMC")
    _write_trace(tmp_path, "FOMC", "trace500", "train", [{"prompt": "p", "answer": "a"}])
    monkeypatch.setenv(tasks.ROOT_ENV, str(tmp_path))
    assert get_task("FOMC").examples("train") == [{"prompt": "p", "answer": "a"}]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        get_task("FOMC").load("dev")


def test_chat_template_wraps_the_task_templates_and_keeps_answers(tmp_path):
    from test_data_tokenizers import build_tiny_hf_tokenizer
    from transformers import PreTrainedTokenizerFast

    from jaxcollab.data import HFTokenizer, metamath_task, with_chat_template

    path = build_tiny_hf_tokenizer(tmp_path / "tok")
    fast = PreTrainedTokenizerFast.from_pretrained(path)
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast.save_pretrained(path)
    tokenizer = HFTokenizer(path)
    assert tokenizer.has_chat_template
    assert tokenizer.chat_prompt("Hi {x}") == "<|user|>Hi {x}</s><|assistant|>"
    train = tmp_path / "train.jsonl"
    train.write_text('{"query": "What is 2+3?", "response": "2+3=5. The answer is: 5"}\n')
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text('{"query": "What is 1+1?", "response": "1+1=2\\n#### 2"}\n')
    task = metamath_task(train_file=train, gsm8k_file=gsm)
    chat = with_chat_template(task, tokenizer.chat_prompt)
    raw_train, raw_test = task.examples("train")[0], task.examples("test")[0]
    assert chat.examples("train")[0] == {"prompt": f"<|user|>{raw_train['prompt']}</s><|assistant|>",
                                         "answer": raw_train["answer"]}
    # the evaluation template (MetaMath's "Let's think step by step.") goes inside the chat too
    assert chat.examples("test")[0]["prompt"] == f"<|user|>{raw_test['prompt']}</s><|assistant|>"
    assert raw_test["prompt"].endswith("Let's think step by step.")

    def drops_the_message(message: str) -> str:
        return "<|assistant|>"

    with pytest.raises(DataError, match="does not place the user's message"):
        with_chat_template(task, drops_the_message)


@needs_trace
def test_constant_answer_baseline_is_the_best_fixed_answer_by_hand():
    from jaxcollab.evaluation import constant_answer_baseline

    fomc = get_task("FOMC", root=TRACE_ROOT)
    train = json.loads((TRACE_ROOT / "FOMC" / "trace500" / "train.json").read_text())
    test = json.loads((TRACE_ROOT / "FOMC" / "trace500" / "test.json").read_text())[:40]
    letters = [row["answer"].strip() for row in train[:256]]  # fitted on the first 256 training rows
    majority = max("ABC", key=letters.count)
    result = constant_answer_baseline(fomc, fomc.examples("train"), split="test", limit=40)
    hits = [float(row["answer"].strip()[:1] == majority) for row in test]
    assert result.predictions == [majority] * 40 and result.items == hits and result.score == sum(hits) / 40
    # ScienceQA: every answer is a letter and its explanation, all distinct; the metric reads the letter, so
    # the constant is an answer with the letter most frequent among the fitted rows.
    science = get_task("ScienceQA", root=TRACE_ROOT)
    rows = science.examples("train")
    first = [row["answer"].strip()[:1] for row in rows[:256]]
    result = constant_answer_baseline(science, rows, split="test", limit=40)
    assert result.predictions[0][0] == max("ABCDE", key=first.count) and len(set(first)) > 1
    with pytest.raises(ValueError, match="no training answers"):
        constant_answer_baseline(fomc, [], split="test")

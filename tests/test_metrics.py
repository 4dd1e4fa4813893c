"""TRACE metrics: hand-computed cases, the reference packages where they define the metric, and real TRACE gold."""

import json
from collections import Counter
from fractions import Fraction

import pytest
from rapidfuzz import fuzz
from rouge_score import rouge_scorer
from trace_root import TRACE_ROOT as TRACE

from jaxcollab.evaluation import metrics
from jaxcollab.evaluation.metrics import (
    METRICS,
    accuracy,
    edit_similarity,
    exact_match,
    final_number,
    gsm8k,
    rouge_l,
    sari,
    sari_components,
    score,
)

GSM8K_TEST = TRACE / "MetaMathQA/eval_from_MetaMath_repo/GSM8K_test.jsonl"


# ----------------------------------------------------------------------------------------------------
# accuracy / exact match


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("B", "B", 1.0),
        (" \nB\n", "B", 1.0),  # surrounding whitespace is stripped first
        ("B. hawkish", "B", 1.0),  # only the first character counts
        ("B\nBecause the clause ...", "B\nA clause is a group of words ...", 1.0),  # ScienceQA
        ("A", "B", 0.0),
        ("b", "B", 0.0),  # case-sensitive, like TRACE
        ("", "A", 0.0),
        ("   ", "A", 0.0),
        ("A", "", 0.0),
    ],
)
def test_accuracy(prediction, reference, expected):
    assert accuracy(prediction, reference) == expected


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [("13.5", " 13.5\n", 1.0), ("13.50", "13.5", 0.0), ("friday", "Friday", 0.0), ("", "", 1.0)],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


# ----------------------------------------------------------------------------------------------------
# ROUGE-L


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        # 6 and 6 tokens, LCS "the cat on mat" = 4: P = R = 4/6, F = 2/3
        ("the cat sat on the mat", "the cat lay on a mat", 2 / 3),
        # 5 and 2 tokens, LCS "a c" = 2: P = 2/5, R = 1, F = 2 * 0.4 / 1.4 = 4/7
        ("a b c d e", "a c", 4 / 7),
        # case kept (as TRACE's `rouge` package does): LCS "cat" = 1 of 2: F = 1/2
        ("The cat", "the cat", 1 / 2),
        # "." separates words like whitespace (TRACE splits sentences at "."): identical token lists
        ("end.Start  here", "end Start here", 1.0),
        # other punctuation stays attached and there is no stemming
        ("cat,", "cat", 0.0),
        ("cats", "cat", 0.0),
        ("", "a summary", 0.0),
    ],
)
def test_rouge_l_hand_computed(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_tokens_follow_trace():
    assert metrics.TraceWordTokenizer().tokenize("Hello world. Next, one...\nTwo") == [
        "Hello",
        "world",
        "Next,",
        "one",
        "Two",
    ]


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("the council approved the budget for parks", "council approved budget for the new parks"),
        ("recommendation to adopt resolution", "recommendation to adopt a resolution authorizing"),
    ],
)
def test_rouge_l_is_rouge_score_where_tokenizations_agree(prediction, reference):
    # Lowercase words without punctuation: rouge_score's default tokenizer yields the same tokens.
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected < 1.0


# ----------------------------------------------------------------------------------------------------
# edit similarity


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        # Indel: LCS "ab" = 2 of lengths 3 + 3: 2 * 2 / 6
        ("abc", "abd", 2 / 3),
        # TRACE does not strip whitespace: LCS 1 of lengths 1 + 2: 2 * 1 / 3
        (")", ") ", 2 / 3),
        # literal placeholders are resolved on both sides before comparing
        ("x = 0", "x = <NUM_LIT>", 1.0),
        ("print ( '' )", "print ( '<STR_LIT>' )", 1.0),
        ("path = 'error'", "path = '<STR_LIT:error>'", 1.0),
        ("c = 'a'", "c = '<CHAR_LIT:a>'", 1.0),
        ("return <NUM_LIT:200>", "return 200", 1.0),
        ("", "return x", 0.0),
        ("<STR_LIT>", "return x", 0.0),  # empty after post-processing, as in TRACE
    ],
)
def test_edit_similarity_hand_computed(prediction, reference, expected):
    assert edit_similarity(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_edit_similarity_is_rapidfuzz_ratio():
    prediction, reference = "if sig == signal . CTRL_C_EVENT :", "if sig == signal.CTRL_BREAK_EVENT:"
    assert edit_similarity(prediction, reference) == fuzz.ratio(prediction, reference) / 100


# ----------------------------------------------------------------------------------------------------
# SARI


def test_sari_hand_computed_single_reference():
    # source "the cat sat", prediction "the cat ran", reference "the dog ran".
    # n=1: kept {the, cat}, of which right (in reference) {the}: P = (1 + 0) / 2, keepable (source ∩ ref)
    #      {the}: R = 1/1, F = 2/3. deleted {sat}, not in reference: P_del = 1. added {ran}, right {ran},
    #      addable (ref - source) {dog, ran}: P = 1, R = 1/2, F = 2/3.
    # n=2: kept {"the cat"}, not in reference: P = 0; keepable {} -> R = 1 (0/0 := 1); F = 0.
    #      deleted {"cat sat"}, not in reference: 1. added {"cat ran"}, right {}: P = 0, R = 0, F = 0.
    # n=3: kept {} -> P = 1, keepable {} -> R = 1, F = 1. deleted {"the cat sat"}: 1.
    #      added {"the cat ran"}, right {}: P = 0; addable {"the dog ran"}: R = 0; F = 0.
    # n=4: no 4-grams anywhere: keep 1, delete 1, add 1.
    # keep = (2/3 + 0 + 1 + 1) / 4 = 2/3, delete = 1, add = (2/3 + 0 + 0 + 1) / 4 = 5/12,
    # SARI = (2/3 + 1 + 5/12) / 3 = 25/36.
    parts = sari_components("the cat ran", "the dog ran", "the cat sat")
    assert (parts.keep, parts.delete, parts.add) == pytest.approx((2 / 3, 1.0, 5 / 12), abs=1e-12)
    assert sari("the cat ran", "the dog ran", "the cat sat") == pytest.approx(25 / 36, abs=1e-12)


def test_sari_hand_computed_repeated_ngrams():
    # source "a a b" (a:2, b:1), prediction "a b" (a:1, b:1), reference "a b b" (a:1, b:2).
    # n=1: kept = min(source, prediction) = {a:1, b:1}, right = min(kept, ref) = {a:1, b:1}: P = 1;
    #      keepable = min(source, ref) = {a:1, b:1}: R = 2/2; F = 1.
    #      deleted = source - prediction = {a:1}; right = deleted - ref = {a: 1 - 1 = 0}: P_del = 0/1 = 0.
    #      added {} -> P = 1; addable = ref - source = {} -> R = 1; F = 1.
    # n=2: source {"a a", "a b"}, prediction {"a b"}, ref {"a b", "b b"}.
    #      kept {"a b"}, right: P = 1; keepable {"a b"}: R = 1; F = 1. deleted {"a a"}, not in ref: 1.
    #      added {} -> P = 1; addable {"b b"}, none added: R = 0; F = 0.
    # n=3: source {"a a b"}, prediction {}, ref {"a b b"}: keep 1 (0/0), deleted {"a a b"}: 1,
    #      added {} P = 1, addable {"a b b"} R = 0: F = 0.
    # n=4: all 1.
    # keep = 1, delete = (0 + 1 + 1 + 1) / 4 = 3/4, add = (1 + 0 + 0 + 1) / 4 = 1/2; SARI = 9/4 / 3 = 3/4.
    parts = sari_components("a b", "a b b", "a a b")
    assert (parts.keep, parts.delete, parts.add) == pytest.approx((1.0, 0.75, 0.5), abs=1e-12)
    assert parts.sari == pytest.approx(0.75, abs=1e-12)


def test_sari_hand_computed_two_references():
    # source "a b", prediction "a", references ["a", "b"]; source and prediction counts are multiplied
    # by the number of references (2): source {a:2, b:2}, prediction {a:2}; references {a:1, b:1}.
    # n=1: kept {a:2}, right min(kept, refs) = {a:1}: P = (1/2) / 1; keepable min(source, refs) =
    #      {a:1, b:1}: R = 1/2; F = 1/2. deleted {b:2}, right = {b: 2 - 1} : P_del = 1/2.
    #      added {} -> P = 1; addable refs - source = {} -> R = 1; F = 1.
    # n=2: source {"a b": 2}, prediction {}, refs {}: keep 1 (0/0), deleted {"a b"} not in refs: 1, add 1.
    # n=3, n=4: all 1.
    # keep = (1/2 + 3) / 4 = 7/8, delete = 7/8, add = 1; SARI = (7/8 + 7/8 + 1) / 3 = 11/12.
    assert sari("a", ["a", "b"], "a b") == pytest.approx(11 / 12, abs=1e-12)


def test_sari_empty_prediction_is_one_empty_token_as_in_huggingface():
    # HF splits the normalised text at " ", so "" is the single token "". Source "a b", reference "a".
    # n=1: source {a, b}, prediction {""}, reference {a}. kept {} -> P = 1; keepable {a}: R = 0; F = 0.
    #      deleted {a, b}; right = deleted - ref = {b}: P_del = (0 + 1) / 2 = 1/2.
    #      added {""}, not in ref: P = 0; addable ref - source = {} -> R = 1; F = 0.
    #      (Were "" no token at all, added would be {} and add F would be 1.)
    # n=2: source {"a b"}, rest empty: keep 1, delete 1 ("a b" not in ref), add 1. n=3, n=4: all 1.
    # keep = 3/4, delete = (1/2 + 3) / 4 = 7/8, add = 3/4; SARI = (6/8 + 7/8 + 6/8) / 3 = 19/24.
    assert sari("", "a", "a b") == pytest.approx(19 / 24, abs=1e-12)


def test_sari_published_huggingface_examples():
    # The values printed in the Hugging Face `sari` metric card (the implementation TRACE calls).
    source = "About 95 species are currently accepted ."
    references = [
        "About 95 species are currently known .",
        "About 95 species are now accepted .",
        "95 species are now accepted .",
    ]
    assert sari("About 95 you now get in .", references, source) == pytest.approx(0.26953601953601954, rel=1e-12)
    # The card's unspaced spelling ("accepted.") gives the same value: 13a splits the final period.
    unspaced = [reference.replace(" .", ".") for reference in references]
    assert sari("About 95 you now get in.", unspaced, source.replace(" .", ".")) == pytest.approx(
        0.26953601953601954, rel=1e-12
    )
    assert sari(source, [source], source) == 1.0


def test_sari_normalisation_lowercases_and_splits_punctuation():
    assert sari("The CAT ran.", "the dog ran .", "The cat sat.") == pytest.approx(
        sari("the cat ran .", "the dog ran .", "the cat sat ."), abs=0
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, world.", "Hello , world ."),
        ("3.14 and 1,000.", "3.14 and 1,000 ."),  # period / comma between digits stays
        ("5-3 e-mail don't", "5 - 3 e-mail don't"),  # dash split only after a digit; apostrophe kept
        ("&quot;hi&quot; (a)", '" hi " ( a )'),
        ("line-\nbreak\nnext", "linebreak next"),
    ],
)
def test_tokenize_13a(text, expected):
    assert metrics.tokenize_13a(text) == expected


def _counts(tokens, order):
    return Counter(tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1))


def test_sari_of_gold_against_itself_on_20minuten():
    """SARI(gold, gold) is not always 1: its delete precision is 1 only if the gold never keeps an n-gram
    fewer times than the source has it (a kept-but-reduced n-gram counts as a wrong deletion). Keep and
    add are always exactly 1 for prediction == reference, so the score lies in [2/3, 1]."""
    rows = json.loads((TRACE / "20Minuten/trace500/test.json").read_text())
    for row in rows:
        gold, source = row["answer"], row["prompt"]
        parts = sari_components(gold, gold, source)
        assert parts.keep == 1.0 and parts.add == 1.0
        source_tokens, gold_tokens = metrics.sari_tokens(source), metrics.sari_tokens(gold)
        partly_kept = any(
            0 < gold_count < _counts(source_tokens, n)[gram]
            for n in range(1, 5)
            for gram, gold_count in _counts(gold_tokens, n).items()
        )
        assert (parts.sari == 1.0) == (not partly_kept)
        assert 2 / 3 <= parts.sari <= 1.0
    golds = [row["answer"] for row in rows]
    assert score("sari", golds, golds, sources=golds) == 1.0  # source == prediction == reference


# ----------------------------------------------------------------------------------------------------
# GSM8K final number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("He makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", 18),
        ("#### 1,450,000", 1450000),
        ("The answer is: 3.50.", 3.5),
        ("The answer is: -4", -4),
        ("It drops to \u22123 degrees", -3),
        ("16-3-4=9", 9),  # minus signs glued to a digit are subtraction, not signs
        ("The answer is: 18 dollars over 7 days", 18),  # marker: the first number after it
        ("She has 3 apples and 5 pears, 8 in all.", 8),  # no marker: the last number
        ("It costs .5 dollars", 0.5),
        ("no number here", None),
        ("The answer is: eighteen", None),
        ("x2 is a name", None),
    ],
)
def test_final_number(text, expected):
    assert final_number(text) == (None if expected is None else Fraction(str(expected)))


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("The answer is: 1000", "#### 1,000", 1.0),
        ("so the total is 3.50.", "#### 3.5", 1.0),
        ("The answer is: 17.5", "#### 18", 0.0),  # compared exactly, not rounded
        ("8 apples. Then 3", "#### 8", 0.0),
        ("I do not know", "#### 8", 0.0),
        ("#### -12", "The answer is: -12", 1.0),
    ],
)
def test_gsm8k(prediction, reference, expected):
    assert gsm8k(prediction, reference) == expected


def test_gsm8k_reference_without_number_is_an_error():
    with pytest.raises(ValueError, match="no final number"):
        gsm8k("42", "#### forty-two")


# ----------------------------------------------------------------------------------------------------
# score: mean and errors


def test_score_is_the_mean_over_all_examples():
    assert score("accuracy", ["A", "B", "C", ""], ["A", "A", "C", "A"]) == 0.5
    # one identical pair (SARI 1) and the 25/36 case above
    value = score("sari", ["a b", "the cat ran"], [["a b"], "the dog ran"], sources=["a b", "the cat sat"])
    assert value == pytest.approx((1 + 25 / 36) / 2, abs=1e-12)


def test_score_errors():
    with pytest.raises(ValueError) as error:
        score("bleu", ["a"], ["a"])
    for name in METRICS:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="3 predictions, 2 references"):
        score("exact_match", ["1", "2", "3"], ["1", "2"])
    with pytest.raises(ValueError, match="needs sources"):
        score("sari", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 sources, 1 predictions"):
        score("sari", ["a"], ["a"], sources=["a", "b"])
    with pytest.raises(ValueError, match="no examples"):
        score("accuracy", [], [])
    with pytest.raises(TypeError, match=r"predictions\[1\]"):
        score("accuracy", ["A", None], ["A", "B"])
    with pytest.raises(TypeError, match=r"references\[0\]"):
        score("accuracy", ["A"], [["A"]])


# ----------------------------------------------------------------------------------------------------
# gold against itself on real TRACE answers

SELF_SCORE_CASES = [
    ("C-STANCE", "accuracy"),
    ("FOMC", "accuracy"),
    ("ScienceQA", "accuracy"),
    ("MeetingBank", "rouge_l"),
    ("Py150", "edit_similarity"),
    ("NumGLUE-cm", "exact_match"),
    ("NumGLUE-ds", "exact_match"),
]


@pytest.mark.parametrize("task, metric", SELF_SCORE_CASES)
def test_each_metric_scores_gold_against_itself_as_one(task, metric):
    rows = json.loads((TRACE / task / "trace500/test.json").read_text())
    golds = [row["answer"] for row in rows]
    assert len(golds) >= 80
    assert score(metric, golds, golds) == 1.0
    assert all(METRICS[metric](gold, gold) == 1.0 for gold in golds)


def test_gsm8k_gold_against_itself_on_metamath_gsm8k():
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    responses = [row["response"] for row in rows]
    assert len(responses) == 1319
    assert score("gsm8k", responses, responses) == 1.0
    # The MetaMath answer style against the GSM8K gold: "The answer is: N" with the number from "#### N".
    metamath_style = [f"Step by step.\nThe answer is: {response.split('####')[-1].strip()}" for response in responses]
    assert score("gsm8k", metamath_style, responses) == 1.0
    # and a wrong final number is caught on every row
    shifted = [f"The answer is: {final_number(response) + 1}" for response in responses]
    assert score("gsm8k", shifted, responses) == 0.0


def test_item_scores_are_what_score_averages():
    from jaxcollab.evaluation.metrics import item_scores

    assert item_scores("exact_match", [" a", "b", "c"], ["a", "x", "c "]) == [1.0, 0.0, 1.0]
    assert item_scores("accuracy", ["B. yes", "A"], ["B", "C"]) == [1.0, 0.0]
    predictions, references = ["def f(x):", "return 1"], ["def f(y):", "return 2"]
    items = item_scores("edit_similarity", predictions, references)
    assert score("edit_similarity", predictions, references) == pytest.approx(sum(items) / 2)
    assert 0 < items[0] < 1

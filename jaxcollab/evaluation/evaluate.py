"""Score a model on a task: greedy answers to the task's prompts, decoded and scored with the task's metric.

The prompt the model sees at evaluation is exactly the training prefix: BOS + tokenized prompt
(`data.prepare_eval`, left-truncated to `max_prompt_len`), and generation stops at the tokenizer's EOS
or after the task's `max_new_tokens`. The answer is the decoded text before the EOS.

`constant_answer_baseline` scores the same rows without a model: every prompt answered with one answer,
the best constant on the training rows. A trained model that scores no better has learned the answer prior
of the task (say its majority class), not the task.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jaxcollab.data.pipeline import prepare_eval
from jaxcollab.data.tasks import Task
from jaxcollab.data.tokenizers import Tokenizer
from jaxcollab.evaluation.generate import greedy
from jaxcollab.evaluation.metrics import METRICS_NEEDING_SOURCES, item_scores
from jaxcollab.model.config import LlamaConfig


@dataclass(frozen=True)
class TaskResult:
    task: str
    metric: str
    score: float
    predictions: list[str]
    references: list[str]
    items: list[float]  # the metric of each example; `score` is their mean


def evaluate_task(
    cfg: LlamaConfig,
    params: dict,
    task: Task,
    tokenizer: Tokenizer,
    *,
    split: str = "test",
    lora: Any = None,
    limit: int | None = None,
    max_prompt_len: int = 2048,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> TaskResult:
    """Generate an answer to every prompt of `split` (the first `limit`) and score them."""
    evalset = prepare_eval(task.load(split), tokenizer, max_prompt_len=max_prompt_len, limit=limit)
    outputs = greedy(cfg, params, evalset.prompt_ids, max_new_tokens or task.max_new_tokens,
                     eos_id=tokenizer.eos_id, lora=lora, batch_size=batch_size, pad_id=tokenizer.pad_id)
    predictions = [tokenizer.decode([t for t in out if t != tokenizer.eos_id]) for out in outputs]
    sources = evalset.prompts if task.metric in METRICS_NEEDING_SOURCES else None
    items = item_scores(task.metric, predictions, evalset.references, sources=sources)
    return TaskResult(task.name, task.metric, sum(items) / len(items), predictions, list(evalset.references), items)


def constant_answer_baseline(task: Task, train_rows: Sequence[Mapping[str, str]], *, split: str = "test",
                             limit: int | None = None, candidates: int = 16, fit_rows: int = 256) -> TaskResult:
    """The score of answering every prompt of `split` (the first `limit`, as `evaluate_task` takes them) with
    one fixed answer: the best constant fitted on the training rows, i.e. of the `candidates` most frequent
    training answers (stripped; ties in the order seen), the one whose mean metric against the first `fit_rows`
    training answers is highest (so for a task scored on the first letter it is an answer with the most
    frequent letter, even when every full answer is unique)."""
    answers = [row["answer"].strip() for row in train_rows]
    if not answers:
        raise ValueError(f"task {task.name}: no training answers to fit a constant answer on")
    fit = list(train_rows[:fit_rows])
    fit_sources = [row["prompt"] for row in fit] if task.metric in METRICS_NEEDING_SOURCES else None

    def fitted(candidate: str) -> float:
        return sum(item_scores(task.metric, [candidate] * len(fit), [row["answer"] for row in fit],
                               sources=fit_sources))

    constant = max((answer for answer, _ in Counter(answers).most_common(candidates)), key=fitted)
    rows = task.examples(split)[:limit] if limit else task.examples(split)
    if not rows:
        raise ValueError(f"task {task.name}: the {split} split is empty")
    references = [row["answer"] for row in rows]
    predictions = [constant] * len(rows)
    sources = [row["prompt"] for row in rows] if task.metric in METRICS_NEEDING_SOURCES else None
    items = item_scores(task.metric, predictions, references, sources=sources)
    return TaskResult(task.name, task.metric, sum(items) / len(items), predictions, references, items)

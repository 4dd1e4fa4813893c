"""Score a model on a task: greedy answers to the task's prompts, decoded and scored with the task's metric.

The prompt the model sees at evaluation is exactly the training prefix: BOS + tokenized prompt
(`data.prepare_eval`, left-truncated to `max_prompt_len`), and generation stops at the tokenizer's EOS
or after the task's `max_new_tokens`. The answer is the decoded text before the EOS.
"""

from __future__ import annotations

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

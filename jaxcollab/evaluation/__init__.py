"""Evaluation: generation, TRACE task metrics, log-likelihood scoring and the knowledge accounting.

    from jaxcollab.evaluation import greedy, evaluate_task, multiple_choice
    greedy(cfg, params, prompt_ids, max_new_tokens, eos_id)  # KV-cache greedy decoding
    evaluate_task(cfg, params, task, tokenizer)           # generate on a task's test split and score it
    multiple_choice(cfg, params, tokenizer, rows)         # acc / acc_norm as lm-eval defines them

    from jaxcollab.evaluation import score, summarize
    score("rouge_l", predictions, references)             # mean over examples, in [0, 1]
    score("sari", predictions, references, sources=prompts)
    summarize(R, old)                                     # measures per round, JSON-ready
"""

from jaxcollab.evaluation.evaluate import TaskResult, evaluate_task
from jaxcollab.evaluation.generate import greedy
from jaxcollab.evaluation.knowledge import (
    MEASURES,
    KnowledgeMatrix,
    backward_transfer,
    new_knowledge,
    old_knowledge,
    overall_performance,
    recent_knowledge,
    summarize,
)
from jaxcollab.evaluation.loglik import (
    load_multiple_choice_jsonl,
    loglikelihood,
    loglikelihood_rolling,
    multiple_choice,
)
from jaxcollab.evaluation.metrics import (
    METRICS,
    METRICS_NEEDING_SOURCES,
    SariComponents,
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

__all__ = [
    "MEASURES",
    "METRICS",
    "METRICS_NEEDING_SOURCES",
    "KnowledgeMatrix",
    "SariComponents",
    "TaskResult",
    "accuracy",
    "backward_transfer",
    "edit_similarity",
    "evaluate_task",
    "exact_match",
    "final_number",
    "greedy",
    "gsm8k",
    "load_multiple_choice_jsonl",
    "loglikelihood",
    "loglikelihood_rolling",
    "multiple_choice",
    "new_knowledge",
    "old_knowledge",
    "overall_performance",
    "recent_knowledge",
    "rouge_l",
    "sari",
    "sari_components",
    "score",
    "summarize",
]

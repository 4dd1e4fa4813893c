"""Evaluation: TRACE task metrics and the knowledge accounting (score matrix, new/recent/old, OP, BWT).

    from jaxcollab.evaluation import score, summarize
    score("rouge_l", predictions, references)             # mean over examples, in [0, 1]
    score("sari", predictions, references, sources=prompts)
    summarize(R, old)                                     # measures per round, JSON-ready
"""

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
    "accuracy",
    "backward_transfer",
    "edit_similarity",
    "exact_match",
    "final_number",
    "gsm8k",
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

"""Evaluation: generation, TRACE task metrics, log-likelihood scoring and the knowledge accounting.

    from jaxcollab.evaluation import greedy, evaluate_task, multiple_choice
    greedy(cfg, params, prompt_ids, max_new_tokens, eos_id)  # KV-cache greedy decoding
    evaluate_task(cfg, params, task, tokenizer)           # generate on a task's test split and score it
    multiple_choice(cfg, params, tokenizer, rows)         # acc / acc_norm as lm-eval defines them

    from jaxcollab.evaluation import score, summarize
    score("rouge_l", predictions, references)             # mean over examples, in [0, 1]
    score("sari", predictions, references, sources=prompts)
    summarize(R, old)                                     # measures per round, JSON-ready

    from jaxcollab.evaluation import evaluate_old_knowledge, paired_difference_ci
    base = evaluate_old_knowledge("mmlu_text", cfg, base_params, tokenizer, size=500)
    model = evaluate_old_knowledge("mmlu_text", cfg, params, tokenizer, size=500)
    paired_difference_ci(model.per_item, base.per_item)  # 95 % interval of the change
"""

from jaxcollab.evaluation import knowledge
from jaxcollab.evaluation.drift import relative_change
from jaxcollab.evaluation.evaluate import TaskResult, constant_answer_baseline, evaluate_task
from jaxcollab.evaluation.generate import greedy
from jaxcollab.evaluation.knowledge import (
    MEASURES,
    KnowledgeMatrix,
    backward_transfer,
    new_knowledge,
    overall_performance,
    recent_knowledge,
    summarize,
)
from jaxcollab.evaluation.loglik import (
    load_multiple_choice_jsonl,
    loglikelihood,
    loglikelihood_rolling,
    loglikelihood_tokens,
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
    item_scores,
    rouge_l,
    sari,
    sari_components,
    score,
)
from jaxcollab.evaluation.mmlu import (
    MMLU_SUBJECTS,
    MmluQuestion,
    load_mmlu,
    mmlu_heldout,
    mmlu_subset,
    score_mmlu,
    score_mmlu_text,
)
from jaxcollab.evaluation.old_measures import (
    OLD_KNOWLEDGE_MEASURES,
    OldKnowledgeScore,
    evaluate_old_knowledge,
)
from jaxcollab.evaluation.stats import mean_ci, paired_difference_ci, proportion_ci

# Loading the submodule `old_knowledge` (the registry of measures) rebound the package attribute of that name
# to the module; the public `old_knowledge` stays the per-round measure of `knowledge`.
old_knowledge = knowledge.old_knowledge

__all__ = [
    "MEASURES",
    "METRICS",
    "METRICS_NEEDING_SOURCES",
    "MMLU_SUBJECTS",
    "OLD_KNOWLEDGE_MEASURES",
    "KnowledgeMatrix",
    "MmluQuestion",
    "OldKnowledgeScore",
    "SariComponents",
    "TaskResult",
    "accuracy",
    "backward_transfer",
    "constant_answer_baseline",
    "edit_similarity",
    "evaluate_old_knowledge",
    "evaluate_task",
    "exact_match",
    "final_number",
    "greedy",
    "gsm8k",
    "item_scores",
    "load_mmlu",
    "load_multiple_choice_jsonl",
    "loglikelihood",
    "loglikelihood_rolling",
    "loglikelihood_tokens",
    "mean_ci",
    "mmlu_heldout",
    "mmlu_subset",
    "multiple_choice",
    "new_knowledge",
    "old_knowledge",
    "overall_performance",
    "paired_difference_ci",
    "proportion_ci",
    "recent_knowledge",
    "relative_change",
    "rouge_l",
    "sari",
    "sari_components",
    "score",
    "score_mmlu",
    "score_mmlu_text",
    "summarize",
]

"""Data: task registry (TRACE, MetaMath, Lima, synthetic knowledge), tokenizers, grain pipelines, mixtures.

    task = data.get_task("FOMC", root=TRACE_ROOT, variant="trace500")
    train = task.load("train")                                   # datasets.Dataset of {"prompt", "answer"}
    pipeline = data.build_train_pipeline(train, data.ByteTokenizer(), seq_len=256, batch_size=8)
    batch = next(iter(pipeline))   # {"tokens", "loss_mask", "segment_ids", "positions"}: [batch, seq_len]
    evalset = data.prepare_eval(task.load("test"), tokenizer, max_prompt_len=1024)
"""

from jaxcollab.data.mixtures import joint_mixture, replay_indices, replay_mixture, replay_size
from jaxcollab.data.pipeline import (
    BATCH_KEYS,
    EncodedExample,
    EvalSet,
    TokenizationStats,
    TrainPipeline,
    build_train_pipeline,
    encode_example,
    left_pad,
    prepare_eval,
    tokenize_examples,
)
from jaxcollab.data.synthetic import Fact, SyntheticDomain, synthetic_domains, synthetic_tasks
from jaxcollab.data.tasks import (
    ALPACA_TEMPLATE,
    GSM8K_EVAL_TEMPLATE,
    METRICS,
    PAPER_TASK_ORDER,
    SPLITS,
    TRACE_TASKS,
    TRACE_VARIANTS,
    DataError,
    MissingDataError,
    Task,
    get_task,
    lima_task,
    list_tasks,
    metamath_task,
    read_trace_file,
    to_dataset,
    trace_task,
    with_chat_template,
)
from jaxcollab.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, TokenizerError, check_fits_model

__all__ = [
    "ALPACA_TEMPLATE",
    "BATCH_KEYS",
    "GSM8K_EVAL_TEMPLATE",
    "METRICS",
    "PAPER_TASK_ORDER",
    "SPLITS",
    "TRACE_TASKS",
    "TRACE_VARIANTS",
    "ByteTokenizer",
    "DataError",
    "EncodedExample",
    "EvalSet",
    "Fact",
    "HFTokenizer",
    "MissingDataError",
    "SyntheticDomain",
    "Task",
    "TokenizationStats",
    "Tokenizer",
    "TokenizerError",
    "check_fits_model",
    "TrainPipeline",
    "build_train_pipeline",
    "encode_example",
    "get_task",
    "joint_mixture",
    "left_pad",
    "lima_task",
    "list_tasks",
    "metamath_task",
    "prepare_eval",
    "read_trace_file",
    "replay_indices",
    "replay_mixture",
    "replay_size",
    "synthetic_domains",
    "synthetic_tasks",
    "to_dataset",
    "tokenize_examples",
    "trace_task",
    "with_chat_template",
]

"""grain pipelines: `{"prompt", "answer"}` examples -> fixed-shape training batches, and prompts for generation.

Batch format (what the training loop consumes): a dict of numpy arrays, all of shape [batch, seq_len]:

- `tokens` int32: BOS + prompt + answer + EOS per example (BOS only where the tokenizer's convention has one,
  `tokenizer.add_bos`; SmolLM2's has none); packed rows hold several examples back to back; padding is
  `tokenizer.pad_id`.
- `loss_mask` float32: 1.0 where the token is an answer token or the EOS after the answer (the token to
  predict from the tokens before it in the same segment), 0.0 on BOS, prompt and padding. The loss is
  `CE(logits[:, t-1], tokens[:, t]) * loss_mask[:, t]`; since every segment starts with a token whose mask
  is 0 (its BOS, or its first prompt token; an example with an empty prompt gets a BOS even where the
  tokenizer has none, so that its first answer token is predicted from something), no loss term crosses
  from one packed example to the next.
- `segment_ids` int32: 1, 2, 3, ... for the examples in a row, 0 on padding.
- `positions` int32: position inside its own example (0 at its first token), 0 on padding.

Building a batch:
1. Tokenize eagerly (once, in the calling process): prompt and answer are encoded separately and joined
   as `[BOS] + prompt + answer + [EOS]` (`tokenizer.start_ids` first), so the mask boundary is exact and the
   prompt tokens are the same ones the model sees at evaluation. (Encoding the concatenated string, as
   Alpaca-style code does, can merge tokens across the boundary.)
2. Over-long examples (more than `seq_len` tokens) lose tokens from the LEFT of the prompt; the answer and
   its EOS are kept whole. The prompt keeps at least `floor = min(len(prompt), seq_len // 4)` tokens: if
   BOS + floor + answer + EOS still does not fit, the answer is cut on the right to `seq_len - 1 - floor`
   tokens and has no EOS (`overlong_answer="drop"` drops such examples instead). Counts are in
   `TokenizationStats` (`pipeline.stats`) and logged as a warning.
3. grain: `MapDataset.source` -> optional shard (`shard_index::shard_count`) -> `shuffle(seed)` (reseeded
   every epoch) -> `repeat(num_epochs)` (None: forever) -> `to_iter_dataset` -> pack
   (`grain.experimental.FirstFitPackIterDataset`: first-fit into `num_packing_bins` rows, never splitting an
   example; the filled rows are emitted in a seeded order; examples of consecutive epochs may share a row)
   or pad (one example per row) -> `batch(batch_size)` -> the batch format above.
4. The last partial batch of a finite pipeline is dropped by default (`drop_remainder=True`, fixed shapes
   for `jit`); with `drop_remainder=False` it is filled up with all-padding rows (segment 0, mask 0).
5. `iter(pipeline)` is a grain `DatasetIterator`: `get_state()` returns a JSON-serialisable dict and
   `set_state(state)` on a fresh iterator of the same pipeline resumes with exactly the next batch.
   `worker_count > 0` adds grain worker processes (`mp_prefetch`): the order then depends on the worker
   count, so resume with the same count. grain's workers read absl flags: if nothing has parsed them
   (no `absl.app.run`), they are marked parsed with their defaults. The default is 0 workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from jaxcollab.data.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "BATCH_KEYS",
    "EncodedExample",
    "EvalSet",
    "TokenizationStats",
    "TrainPipeline",
    "build_train_pipeline",
    "encode_example",
    "left_pad",
    "prepare_eval",
    "tokenize_examples",
]

BATCH_KEYS: tuple[str, ...] = ("tokens", "loss_mask", "segment_ids", "positions")
OVERLONG_POLICIES = ("truncate", "drop")


@dataclass(frozen=True)
class EncodedExample:
    """`tokens` = [BOS] + prompt + answer (+ [EOS]); the first `num_prompt_tokens` (BOS included) carry no loss."""

    tokens: np.ndarray
    num_prompt_tokens: int
    prompt_truncated: bool
    answer_truncated: bool

    def loss_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.tokens), np.float32)
        mask[self.num_prompt_tokens:] = 1.0
        return mask


@dataclass(frozen=True)
class TokenizationStats:
    """What tokenization did to a set of examples."""

    num_examples: int  # examples kept
    num_prompt_truncated: int  # prompt shortened on the left
    num_answer_truncated: int  # answer shortened on the right (EOS lost); these are kept
    num_dropped: int  # dropped because the answer did not fit (overlong_answer="drop")
    num_tokens: int  # tokens of the kept examples, BOS and EOS included
    num_loss_tokens: int  # answer + EOS tokens of the kept examples
    max_length: int  # longest kept example, in tokens


def _column(examples: Any, key: str) -> list[str]:
    if hasattr(examples, "column_names"):  # datasets.Dataset
        return list(examples[key])
    return [row[key] for row in examples]


def encode_example(prompt_ids: Sequence[int], answer_ids: Sequence[int], *, bos_id: int | None, eos_id: int,
                   seq_len: int) -> EncodedExample:
    """Join and, if needed, truncate one example (see step 2 of the module docstring).

    `bos_id=None`: no BOS (a tokenizer without one), unless the prompt is empty, which needs the BOS as the
    context of the first answer token; pass `tokenizer.bos_id if tokenizer.add_bos else None`.
    """
    if seq_len < 3:
        raise ValueError(f"seq_len must be at least 3 (BOS, one token, EOS), got {seq_len}")
    prompt, answer = list(prompt_ids), list(answer_ids)
    if bos_id is None and not prompt:
        raise ValueError("an example with an empty prompt needs a BOS id to predict its answer from")
    start = [] if bos_id is None else [bos_id]
    prompt_floor = min(len(prompt), seq_len // 4)
    answer_truncated = len(start) + len(answer) + 1 + prompt_floor > seq_len
    if answer_truncated:
        answer = answer[: seq_len - len(start) - prompt_floor]
        tail: list[int] = []
        prompt_budget = prompt_floor
    else:
        tail = [eos_id]
        prompt_budget = seq_len - len(start) - 1 - len(answer)
    prompt_truncated = len(prompt) > prompt_budget
    if prompt_truncated:
        prompt = prompt[len(prompt) - prompt_budget:]
    tokens = np.asarray([*start, *prompt, *answer, *tail], np.int32)
    return EncodedExample(tokens, len(start) + len(prompt), prompt_truncated, answer_truncated)


def tokenize_examples(examples: Any, tokenizer: Tokenizer, *, seq_len: int,
                      overlong_answer: str = "truncate") -> tuple[list[EncodedExample], TokenizationStats]:
    """Encode `{"prompt", "answer"}` examples (a list or a `datasets.Dataset`) for training."""
    if overlong_answer not in OVERLONG_POLICIES:
        raise ValueError(f"unknown overlong_answer {overlong_answer!r}; valid: {', '.join(OVERLONG_POLICIES)}")
    prompts, answers = _column(examples, "prompt"), _column(examples, "answer")
    prompt_ids, answer_ids = tokenizer.encode_batch(prompts), tokenizer.encode_batch(answers)
    encoded: list[EncodedExample] = []
    dropped = 0
    for p, a in zip(prompt_ids, answer_ids, strict=True):
        bos_id = tokenizer.bos_id if tokenizer.add_bos or not p else None
        example = encode_example(p, a, bos_id=bos_id, eos_id=tokenizer.eos_id, seq_len=seq_len)
        if example.answer_truncated and overlong_answer == "drop":
            dropped += 1
            continue
        encoded.append(example)
    stats = TokenizationStats(
        num_examples=len(encoded),
        num_prompt_truncated=sum(e.prompt_truncated for e in encoded),
        num_answer_truncated=sum(e.answer_truncated for e in encoded),
        num_dropped=dropped,
        num_tokens=sum(len(e.tokens) for e in encoded),
        num_loss_tokens=sum(len(e.tokens) - e.num_prompt_tokens for e in encoded),
        max_length=max((len(e.tokens) for e in encoded), default=0),
    )
    if stats.num_prompt_truncated or stats.num_answer_truncated or stats.num_dropped:
        logger.warning("tokenization at seq_len=%d: %d of %d prompts truncated on the left, %d answers truncated, "
                       "%d examples dropped", seq_len, stats.num_prompt_truncated, len(prompts),
                       stats.num_answer_truncated, stats.num_dropped)
    return encoded, stats


# --------------------------------------------------------------------------------------------------- batches


class _ToArrays(grain.transforms.Map):
    """EncodedExample -> {"tokens", "loss_mask"} variable-length arrays."""

    def map(self, example: EncodedExample) -> dict[str, np.ndarray]:
        return {"tokens": example.tokens, "loss_mask": example.loss_mask()}


@dataclass(frozen=True)
class _PadRow(grain.transforms.Map):
    """One example per row, padded on the right to `seq_len`."""

    seq_len: int
    pad_id: int

    def map(self, example: EncodedExample) -> dict[str, np.ndarray]:
        n = len(example.tokens)
        tokens = np.full(self.seq_len, self.pad_id, np.int32)
        tokens[:n] = example.tokens
        loss_mask = np.zeros(self.seq_len, np.float32)
        loss_mask[:n] = example.loss_mask()
        segment_ids = np.zeros(self.seq_len, np.int32)
        segment_ids[:n] = 1
        positions = np.zeros(self.seq_len, np.int32)
        positions[:n] = np.arange(n, dtype=np.int32)
        return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions}


class _FromPacked(grain.transforms.Map):
    """grain's packed row (`tokens`, `tokens_segment_ids`, `tokens_positions`, `loss_mask`) -> batch format."""

    def map(self, row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "tokens": np.asarray(row["tokens"], np.int32),
            "loss_mask": np.asarray(row["loss_mask"], np.float32),
            "segment_ids": np.asarray(row["tokens_segment_ids"], np.int32),
            "positions": np.asarray(row["tokens_positions"], np.int32),
        }


@dataclass(frozen=True)
class _FillBatch(grain.transforms.Map):
    """Fill a short last batch up to `batch_size` rows of padding (segment 0, mask 0)."""

    batch_size: int
    pad_id: int

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = self.batch_size - batch["tokens"].shape[0]
        if missing <= 0:
            return batch
        fill = {"tokens": self.pad_id, "loss_mask": 0.0, "segment_ids": 0, "positions": 0}
        return {key: np.concatenate([value, np.full((missing, value.shape[1]), fill[key], value.dtype)])
                for key, value in batch.items()}


@dataclass
class TrainPipeline:
    """A grain dataset of training batches plus what tokenization did. `iter()` it for a resumable iterator."""

    dataset: grain.IterDataset
    stats: TokenizationStats
    seq_len: int
    batch_size: int
    packing: bool
    examples_per_epoch: int  # examples this process reads per epoch (its shard)
    drop_remainder: bool

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.dataset)

    def batches_per_epoch(self) -> int | None:
        """Batches per pass over this process's data without packing (None when packing: it depends on the order)."""
        if self.packing:
            return None
        if self.drop_remainder:
            return self.examples_per_epoch // self.batch_size
        return -(-self.examples_per_epoch // self.batch_size)


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside `absl.app.run` nobody has parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        logger.info("marking absl flags as parsed (defaults) for grain worker processes")
        flags.FLAGS.mark_as_parsed()


def build_train_pipeline(examples: Any, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                         packing: bool = True, num_epochs: int | None = 1, shuffle: bool = True, seed: int = 0,
                         drop_remainder: bool = True, num_packing_bins: int | None = None,
                         overlong_answer: str = "truncate", shard_index: int = 0, shard_count: int = 1,
                         worker_count: int = 0, read_threads: int = 1) -> TrainPipeline:
    """Training batches (see the module docstring) from `{"prompt", "answer"}` examples.

    `batch_size` is per process when `shard_count > 1` (each process reads rows `shard_index::shard_count`).
    `num_packing_bins` (default `batch_size`) is how many rows the first-fit packer fills at a time; more bins
    waste less padding.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None (forever), got {num_epochs}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    encoded, stats = tokenize_examples(examples, tokenizer, seq_len=seq_len, overlong_answer=overlong_answer)
    if not encoded:
        raise ValueError(f"no training examples left after tokenization at seq_len={seq_len} ({stats})")

    ds = grain.MapDataset.source(encoded)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
        if len(ds) == 0:
            raise ValueError(f"shard {shard_index} of {shard_count} has no examples ({len(encoded)} in all)")
    examples_per_epoch = len(ds)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(1, 4 * read_threads))
    if packing:
        it = ds.map(_ToArrays()).to_iter_dataset(read_options)
        it = grain.experimental.FirstFitPackIterDataset(
            it,
            length_struct={"tokens": seq_len, "loss_mask": seq_len},
            num_packing_bins=num_packing_bins or batch_size,
            seed=seed,
            shuffle_bins=shuffle,
            padding_struct={"tokens": tokenizer.pad_id, "loss_mask": 0.0},
        ).map(_FromPacked())
    else:
        it = ds.map(_PadRow(seq_len, tokenizer.pad_id)).to_iter_dataset(read_options)
    it = it.batch(batch_size, drop_remainder=drop_remainder)
    if not drop_remainder:
        it = it.map(_FillBatch(batch_size, tokenizer.pad_id))
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return TrainPipeline(dataset=it, stats=stats, seq_len=seq_len, batch_size=batch_size, packing=packing,
                         examples_per_epoch=examples_per_epoch, drop_remainder=drop_remainder)


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass(frozen=True)
class EvalSet:
    """Prompts ready for generation: `prompt_ids[i]` = [BOS] + prompt tokens (left-truncated); no BOS where the
    tokenizer has none (`tokenizer.add_bos`), unless the prompt is empty."""

    prompt_ids: list[list[int]]
    references: list[str]
    prompts: list[str]
    num_truncated: int

    def __len__(self) -> int:
        return len(self.prompt_ids)


def prepare_eval(examples: Any, tokenizer: Tokenizer, *, max_prompt_len: int, limit: int | None = None) -> EvalSet:
    """Token ids of each prompt, cut on the left to `max_prompt_len` tokens (BOS included), and the answers."""
    if max_prompt_len < 2:
        raise ValueError(f"max_prompt_len must be at least 2 (BOS and one token), got {max_prompt_len}")
    prompts, answers = _column(examples, "prompt"), _column(examples, "answer")
    if limit is not None:
        prompts, answers = prompts[:limit], answers[:limit]
    prompt_ids, truncated = [], 0
    for ids in tokenizer.encode_batch(prompts):
        start = tokenizer.start_ids if ids else [tokenizer.bos_id]
        if len(ids) > max_prompt_len - len(start):
            ids = ids[len(ids) - (max_prompt_len - len(start)):]
            truncated += 1
        prompt_ids.append([*start, *ids])
    if truncated:
        logger.warning("%d of %d evaluation prompts truncated on the left to %d tokens", truncated, len(prompts),
                       max_prompt_len)
    return EvalSet(prompt_ids=prompt_ids, references=answers, prompts=prompts, num_truncated=truncated)


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """Stack prompts into int32 [B, length] padded on the LEFT, and their int32 attention mask (1 = token)."""
    length = length or max(len(ids) for ids in prompt_ids)
    tokens = np.full((len(prompt_ids), length), pad_id, np.int32)
    mask = np.zeros((len(prompt_ids), length), np.int32)
    for row, ids in enumerate(prompt_ids):
        if len(ids) > length:
            raise ValueError(f"prompt {row} has {len(ids)} tokens, more than length={length}")
        if ids:
            tokens[row, length - len(ids):] = ids
            mask[row, length - len(ids):] = 1
    return tokens, mask

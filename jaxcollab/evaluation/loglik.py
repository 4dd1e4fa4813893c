"""Log-likelihood scoring with a jaxcollab model, with the definitions of lm-evaluation-harness.

This is how "old knowledge" is measured without generation: multiple-choice suites (MMLU, ARC, HellaSwag,
...) score each choice by the log-probability the model gives it after the question, and perplexity
suites sum the log-probability of whole texts.

Definitions (those of lm-eval 0.4's Hugging Face backend for a tokenizer that prepends BOS, as Llama 3's
does):

- A request `(context, continuation)` is tokenized as lm-eval's `TemplateLM._encode_pair`: trailing
  whitespace of the context moves to the front of the continuation; `whole = [BOS] + encode(context +
  continuation)`, `context_ids = [BOS] + encode(context)`, `continuation_ids = whole[len(context_ids):]`.
  An empty context becomes `[BOS]` and the continuation is encoded on its own.
- The model reads `(context_ids + continuation_ids)[-(max_length + 1):][:-1]` (at most `max_length`
  tokens, truncated from the left) and the score is the sum of the log-softmax of the continuation
  tokens at the positions that predict them. `is_greedy` is true when the argmax at every one of those
  positions is the continuation token.
- Rolling log-likelihood (perplexity): the text is encoded without BOS and cut into disjoint windows of
  at most `max_length` predicted tokens, as lm-eval's `get_rolling_token_windows(context_len=1)` followed
  by `make_disjoint_window`: the first window predicts its tokens from `[BOS] + text`, every later
  window sees the `max_length` tokens before the last token it predicts (so the last window has a full
  context). Each token of the text is predicted exactly once; the result is the sum over windows.
- Multiple choice: each choice is scored as the continuation `target_delimiter + choice` (lm-eval's
  default delimiter is one space). `acc` takes the argmax of the summed log-likelihoods; `acc_norm`
  divides each by the length of the choice string in characters and `acc_bytes` by its length in UTF-8
  bytes (both without the delimiter); ties go to the first choice (numpy's argmax), as in lm-eval.

Batching: requests are sorted by length and cut into batches; each batch is right-padded to a
power-of-two length bucket (at least 16 tokens, at most `max_length`) and a power-of-two number of rows
(at most `batch_size`), so a whole evaluation compiles a handful of shapes. Only per-row sums and
greedy flags leave the device, never the [B, T, V] logits: the LM head and the log-softmax run
`SCORE_CHUNK` positions at a time (`model.head_loss.chunked_target_scores`), so peak memory grows with
`batch_size * min(bucket, SCORE_CHUNK) * vocab_size` for the logits.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcollab.data.tokenizers import Tokenizer
from jaxcollab.model.config import LlamaConfig
from jaxcollab.model.head_loss import chunked_target_scores
from jaxcollab.model.llama import forward_hidden, matmul_precision, output_kernel

__all__ = [
    "MultipleChoiceDataError",
    "aggregate_multiple_choice",
    "encode_request",
    "load_multiple_choice_jsonl",
    "loglikelihood",
    "loglikelihood_rolling",
    "loglikelihood_tokens",
    "multiple_choice",
    "multiple_choice_requests",
    "rolling_windows",
    "validate_multiple_choice_row",
]

MIN_LENGTH_BUCKET = 16
SCORE_CHUNK = 256  # positions whose [B, chunk, V] logits are computed at a time
DEFAULT_BATCH_SIZE = 8
MULTIPLE_CHOICE_KEYS = ("context", "choices", "gold")


class MultipleChoiceDataError(ValueError):
    """A multiple-choice row (or file line) that cannot be scored."""


# ------------------------------------------------------------------------------------------------ tokenizing
def encode_request(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids (context with BOS first, continuation) of one request, split as lm-eval splits them."""
    bos = tokenizer.bos_id
    if context == "":
        continuation_ids = tokenizer.encode(continuation)
        if continuation_ids and continuation_ids[0] == bos:
            return continuation_ids[:1], continuation_ids[1:]
        return [bos], continuation_ids
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped):] + continuation
        context = stripped
    whole = [bos, *tokenizer.encode(context + continuation)]
    context_ids = [bos, *tokenizer.encode(context)]
    return context_ids, whole[len(context_ids):]


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, predicted) windows covering `tokens`, each context + predicted <= max_length + 1 long.

    The first window predicts `tokens[:max_length]` from `[prefix_id] + tokens[:max_length - 1]`; each later
    window predicts the next (up to) `max_length` tokens and its context is the tokens before them, so that
    the model input (context + predicted minus the last token) is exactly the `max_length` tokens preceding
    the window's last prediction.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_id], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(len(tokens), done + max_length)
        start = end - max_length - 1  # the model sees tokens[start : end - 1]
        windows.append((tokens[start:done], tokens[done:end]))
        done = end
    return windows


# ---------------------------------------------------------------------------------------------------- scoring
@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_batch(
    cfg: LlamaConfig,
    params: dict,
    lora: Any,
    tokens: jax.Array,  # [B, T] right-padded model input
    mask: jax.Array,  # [B, T] 1 on real tokens
    targets: jax.Array,  # [B, T] the token each position should predict
    scored: jax.Array,  # [B, T] True where the target is a continuation token
) -> tuple[jax.Array, jax.Array]:
    hidden = forward_hidden(cfg, params, tokens, lora, attention_mask=mask)
    target_logprobs, hits = chunked_target_scores(hidden, output_kernel(cfg, params), targets, chunk=SCORE_CHUNK,
                                                  precision=matmul_precision(cfg))
    totals = jnp.sum(jnp.where(scored, target_logprobs, 0.0), axis=1)
    greedy = jnp.all(hits | ~scored, axis=1)
    return totals, greedy


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _resolve_max_length(cfg: LlamaConfig, max_length: int | None) -> int:
    length = cfg.max_position_embeddings if max_length is None else int(max_length)
    if length < 1:
        raise ValueError(f"max_length must be >= 1, got {length}")
    return length


def loglikelihood_tokens(
    cfg: LlamaConfig,
    params: dict,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    lora: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> list[tuple[float, bool]]:
    """(summed log-probability, is_greedy) of each tokenized (context_ids, continuation_ids) request.

    The context must hold at least one token (e.g. BOS); an empty continuation scores (0.0, True).
    max_length: the most tokens the model reads per request (default `cfg.max_position_embeddings`);
    longer requests lose tokens from the left. A continuation longer than `max_length` is an error.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = _resolve_max_length(cfg, max_length)
    results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    inputs: dict[int, tuple[list[int], list[int], int]] = {}
    for index, (context_ids, continuation_ids) in enumerate(requests):
        if len(context_ids) == 0:
            raise ValueError(f"request {index}: the context has no tokens; start it with BOS")
        if len(continuation_ids) > max_length:
            raise ValueError(
                f"request {index}: the continuation has {len(continuation_ids)} tokens, more than "
                f"max_length={max_length}"
            )
        if len(continuation_ids) == 0:
            continue
        window = [*context_ids, *continuation_ids][-(max_length + 1):]
        inputs[index] = (window[:-1], window[1:], len(continuation_ids))
    order = sorted(inputs, key=lambda i: len(inputs[i][0]), reverse=True)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows = min(batch_size, _pow2(len(chunk)))
        length = min(max_length, max(MIN_LENGTH_BUCKET, _pow2(len(inputs[chunk[0]][0]))))
        tokens = np.zeros((rows, length), np.int32)
        mask = np.zeros((rows, length), np.int32)
        targets = np.zeros((rows, length), np.int32)
        scored = np.zeros((rows, length), bool)
        for row, index in enumerate(chunk):
            inp, tgt, num_scored = inputs[index]
            tokens[row, :len(inp)] = inp
            mask[row, :len(inp)] = 1
            targets[row, :len(tgt)] = tgt
            scored[row, len(inp) - num_scored:len(inp)] = True
        totals, greedy = _score_batch(cfg, params, lora, jnp.asarray(tokens), jnp.asarray(mask),
                                      jnp.asarray(targets), jnp.asarray(scored))
        totals, greedy = np.asarray(totals), np.asarray(greedy)
        for row, index in enumerate(chunk):
            results[index] = (float(totals[row]), bool(greedy[row]))
    return results


def loglikelihood(
    cfg: LlamaConfig,
    params: dict,
    tokenizer: Tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    lora: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is_greedy) for each (context, continuation) text pair."""
    encoded = [encode_request(tokenizer, context, continuation) for context, continuation in requests]
    return loglikelihood_tokens(cfg, params, encoded, lora=lora, batch_size=batch_size, max_length=max_length)


def loglikelihood_rolling(
    cfg: LlamaConfig,
    params: dict,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    lora: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> list[float]:
    """Summed log-probability of every token of each text given BOS, in rolling windows of `max_length`."""
    max_length = _resolve_max_length(cfg, max_length)
    owners: list[int] = []
    windows: list[tuple[list[int], list[int]]] = []
    for index, text in enumerate(texts):
        for window in rolling_windows(tokenizer.encode(text), tokenizer.bos_id, max_length):
            owners.append(index)
            windows.append(window)
    scores = loglikelihood_tokens(cfg, params, windows, lora=lora, batch_size=batch_size, max_length=max_length)
    totals = [0.0] * len(texts)
    for index, (value, _) in zip(owners, scores, strict=True):
        totals[index] += value
    return totals


# ---------------------------------------------------------------------------------------------- multiple choice
def validate_multiple_choice_row(row: Any, where: str) -> dict:
    """Check one row `{"context": str, "choices": [str, ...], "gold": int}`; errors start with `where`."""
    if not isinstance(row, Mapping):
        raise MultipleChoiceDataError(f"{where}: expected a JSON object with keys {list(MULTIPLE_CHOICE_KEYS)}, "
                                      f"got {type(row).__name__}")
    missing = [key for key in MULTIPLE_CHOICE_KEYS if key not in row]
    if missing:
        raise MultipleChoiceDataError(f"{where}: missing key(s) {missing}; a row needs {list(MULTIPLE_CHOICE_KEYS)}")
    context, choices, gold = row["context"], row["choices"], row["gold"]
    if not isinstance(context, str):
        raise MultipleChoiceDataError(f"{where}: 'context' must be a string, got {type(context).__name__}")
    if not isinstance(choices, Sequence) or isinstance(choices, str) or len(choices) == 0:
        raise MultipleChoiceDataError(f"{where}: 'choices' must be a non-empty list of strings, got {choices!r}")
    for k, choice in enumerate(choices):
        if not isinstance(choice, str) or choice == "":
            raise MultipleChoiceDataError(
                f"{where}: choice {k} must be a non-empty string (acc_norm divides by its length), got {choice!r}"
            )
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise MultipleChoiceDataError(f"{where}: 'gold' must be an integer index into 'choices', got {gold!r}")
    if not 0 <= gold < len(choices):
        raise MultipleChoiceDataError(
            f"{where}: 'gold'={gold} is out of range for {len(choices)} choices (valid: 0..{len(choices) - 1})"
        )
    return {**row, "choices": list(choices)}


def load_multiple_choice_jsonl(path: str | Path) -> list[dict]:
    """Rows `{"context", "choices", "gold"}` from a JSON-lines file (blank lines skipped), validated."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise MultipleChoiceDataError(f"{where}: not valid JSON ({error.msg})") from None
            rows.append(validate_multiple_choice_row(row, where))
    if not rows:
        raise MultipleChoiceDataError(f"{path}: no rows (expected one JSON object per line)")
    return rows


def multiple_choice_requests(rows: Sequence[Mapping], target_delimiter: str = " ") -> list[tuple[str, str]]:
    """The (context, delimiter + choice) requests of the rows, row by row and choice by choice."""
    return [(row["context"], f"{target_delimiter}{choice}") for row in rows for choice in row["choices"]]


def aggregate_multiple_choice(rows: Sequence[Mapping], loglikelihoods: Sequence[Sequence[float]]) -> dict:
    """acc, acc_norm (per character) and acc_bytes (per UTF-8 byte), averaged over rows, from per-choice scores."""
    if len(rows) != len(loglikelihoods):
        raise ValueError(f"{len(rows)} rows but {len(loglikelihoods)} lists of log-likelihoods")
    if not rows:
        raise ValueError("no rows to aggregate")
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for index, (row, scores) in enumerate(zip(rows, loglikelihoods, strict=True)):
        choices = row["choices"]
        if len(scores) != len(choices):
            raise ValueError(f"row {index}: {len(choices)} choices but {len(scores)} log-likelihoods")
        scores = np.asarray(scores, np.float64)
        chars = np.array([len(choice) for choice in choices], np.float64)
        utf8 = np.array([len(choice.encode("utf-8")) for choice in choices], np.float64)
        gold = row["gold"]
        hits["acc"] += int(np.argmax(scores) == gold)
        hits["acc_norm"] += int(np.argmax(scores / chars) == gold)
        hits["acc_bytes"] += int(np.argmax(scores / utf8) == gold)
    result: dict[str, Any] = {name: count / len(rows) for name, count in hits.items()}
    result["num_rows"] = len(rows)
    return result


def multiple_choice(
    cfg: LlamaConfig,
    params: dict,
    tokenizer: Tokenizer,
    rows: Sequence[Mapping],
    *,
    lora: Any = None,
    target_delimiter: str = " ",
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> dict:
    """Score rows `{"context", "choices", "gold"}`: {"acc", "acc_norm", "acc_bytes", "num_rows"}."""
    rows = [validate_multiple_choice_row(row, f"row {index}") for index, row in enumerate(rows)]
    if not rows:
        raise MultipleChoiceDataError("no rows to score")
    scores = loglikelihood(cfg, params, tokenizer, multiple_choice_requests(rows, target_delimiter), lora=lora,
                           batch_size=batch_size, max_length=max_length)
    per_row, offset = [], 0
    for row in rows:
        per_row.append([value for value, _ in scores[offset:offset + len(row["choices"])]])
        offset += len(row["choices"])
    return aggregate_multiple_choice(rows, per_row)

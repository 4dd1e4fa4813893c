"""Log-likelihood scoring with a jaxcollab model, with the definitions of lm-evaluation-harness.

This is how "old knowledge" is measured without generation: multiple-choice suites (MMLU, ARC, HellaSwag,
...) score each choice by the log-probability the model gives it after the question, and perplexity
suites sum the log-probability of whole texts.

Definitions (those of lm-eval 0.4.13's Hugging Face backend, `HFLM`, with its default `add_bos_token=None`,
i.e. the tokenizer's own special-token convention, `Tokenizer.add_bos`):

- A request `(context, continuation)` is tokenized as lm-eval's `TemplateLM._encode_pair`: trailing
  whitespace of the context moves to the front of the continuation; `whole = start + encode(context +
  continuation)`, `context_ids = start + encode(context)`, `continuation_ids = whole[len(context_ids):]`,
  where `start = tokenizer.start_ids` is `[BOS]` for a tokenizer that prepends BOS (Llama 3, the byte
  tokenizer) and nothing for one that does not (SmolLM2, GPT-2 style); a text whose encoding already
  starts with BOS (it begins with BOS's own string) gets no second one, as lm-eval's `has_bos_prefix`.
- An empty context becomes `[prefix]` and the continuation is encoded on its own (without BOS), where
  `prefix` is lm-eval's `prefix_token_id`: the tokenizer's BOS (a jaxcollab `Tokenizer` always has one;
  lm-eval falls back to EOS only for a tokenizer without BOS). If the continuation itself starts with that
  id, its first token becomes the context instead, as in lm-eval.
- The model reads `(context_ids + continuation_ids)[-(max_length + 1):][:-1]` (at most `max_length`
  tokens, truncated from the left) and the score is the sum of the log-softmax of the continuation
  tokens at the positions that predict them. `is_greedy` is true when the argmax at every one of those
  positions is the continuation token.
- Rolling log-likelihood (perplexity): the text is encoded without BOS and cut into disjoint windows of
  at most `max_length` predicted tokens, as lm-eval's `get_rolling_token_windows(context_len=1)` followed
  by `make_disjoint_window`: the first window predicts its tokens from `[prefix] + text`, every later
  window sees the `max_length` tokens before the last token it predicts (so the last window has a full
  context). Each token of the text is predicted exactly once; the result is the sum over windows. For a
  tokenizer without BOS this is exactly HFLM's `loglikelihood_rolling`. For one that prepends BOS, HFLM
  encodes the text with its BOS too and so also scores log p(BOS | BOS); jaxcollab scores the text alone,
  which equals HFLM with `add_bos_token=False`.
- Multiple choice: each choice is scored as the continuation `target_delimiter + choice` (lm-eval's
  default delimiter is one space). `acc` takes the argmax of the summed log-likelihoods; `acc_norm`
  divides each by the length of the choice string in characters and `acc_bytes` by its length in UTF-8
  bytes (both without the delimiter); ties go to the first choice (numpy's argmax), as in lm-eval.

Batching (`loglikelihood_tokens`), the default "packed" path:

- Requests whose model inputs are identical run once (lm-eval's one-token-continuation cache, generalised):
  MMLU's letter format asks for " A" .. " D" after the same prompt, so one forward serves all four; each
  request reads its own targets from the shared row.
- The distinct inputs are packed, longest first, into rows of `pack_length` tokens (first fit over the
  most recent open rows) with `segment_ids` (attention stays within a segment) and positions restarting
  at 0 in each segment, so a packed segment is computed exactly as if it were alone. An input longer than
  `pack_length` gets a row of the next multiple of `pack_length`, which shorter inputs may share. A
  forward pass takes `batch_size * pack_length` tokens (rows of one length; the last pass of a length is
  padded to a power-of-two number of rows), so an evaluation compiles a handful of shapes.
- Only the hidden states of scored positions go through the LM head: they are gathered into one flat
  list (padded to a power of two), and the head and log-softmax run `SCORE_CHUNK` positions at a time
  (`model.head_loss.chunked_target_scores`). Only per-position log-probabilities and greedy flags leave
  the device, never [B, T, V] logits; per-request sums are taken on the host in float64.

`packed=False` keeps the plain path (each request its own row, right-padded to a power-of-two length
bucket, every position through the head); both give the same numbers up to float32 rounding.
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
    "multiple_choice_hits",
    "multiple_choice_loglikelihoods",
    "multiple_choice_requests",
    "pack_segments",
    "prefix_token_id",
    "rolling_token_counts",
    "rolling_windows",
    "start_with_bos",
    "validate_multiple_choice_row",
]

MIN_LENGTH_BUCKET = 16
SCORE_CHUNK = 256  # positions whose [chunk, V] logits are computed at a time
DEFAULT_BATCH_SIZE = 8
DEFAULT_PACK_LENGTH = 256  # tokens per packed row (capped at max_length)
MIN_SCORED_BUCKET = 64  # the gathered scored positions of a pass are padded to a power of two >= this
OPEN_ROWS = 64  # packing tries the most recent rows only, so it stays linear in the number of inputs
MULTIPLE_CHOICE_KEYS = ("context", "choices", "gold")


class MultipleChoiceDataError(ValueError):
    """A multiple-choice row (or file line) that cannot be scored."""


# ------------------------------------------------------------------------------------------------ tokenizing
def prefix_token_id(tokenizer: Tokenizer) -> int:
    """lm-eval's `prefix_token_id`: what an empty context (or the first rolling window) is conditioned on.

    HFLM takes the tokenizer's BOS when it has one, else EOS; a jaxcollab `Tokenizer` always has a BOS id.
    """
    return tokenizer.bos_id


def encode_request(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids (context, continuation) of one request, split as lm-eval's HF backend splits them.

    The context starts with `tokenizer.start_ids` (BOS only for a tokenizer that prepends it); an empty
    context is `[prefix_token_id(tokenizer)]` (see the module docstring).
    """
    if context == "":
        prefix = prefix_token_id(tokenizer)
        continuation_ids = tokenizer.encode(continuation)
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped):] + continuation
        context = stripped
    context_ids = start_with_bos(tokenizer, tokenizer.encode(context))
    whole = start_with_bos(tokenizer, tokenizer.encode(context + continuation))
    return context_ids, whole[len(context_ids):]


def start_with_bos(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """`tokenizer.start_ids + ids`, unless `ids` already starts with them (a text that begins with BOS's own
    string, which lm-eval's `has_bos_prefix` encodes without a second BOS)."""
    start = tokenizer.start_ids
    return ids if ids[:len(start)] == start else [*start, *ids]


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
@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def _score_batch(
    cfg: LlamaConfig,
    params: dict,
    lora: Any,
    tokens: jax.Array,  # [B, T] right-padded model input
    mask: jax.Array,  # [B, T] 1 on real tokens
    targets: jax.Array,  # [B, T] the token each position should predict
    scored: jax.Array,  # [B, T] True where the target is a continuation token
    *,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """The plain path: every position through the head, per-row sums of the scored ones."""
    hidden = forward_hidden(cfg, params, tokens, lora, attention_mask=mask)
    target_logprobs, hits = chunked_target_scores(hidden, output_kernel(cfg, params), targets, chunk=chunk,
                                                  precision=matmul_precision(cfg))
    totals = jnp.sum(jnp.where(scored, target_logprobs, 0.0), axis=1)
    greedy = jnp.all(hits | ~scored, axis=1)
    return totals, greedy


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def _score_positions(
    cfg: LlamaConfig,
    params: dict,
    hidden: jax.Array,  # [R, T, d] final-normed hidden states of packed rows
    flat_positions: jax.Array,  # [S] indices into the R * T positions
    targets: jax.Array,  # [S] the token each of those positions should predict
    *,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """The packed path's head: (log p(target), target is the argmax) at the gathered positions, [S] each."""
    picked = hidden.reshape(-1, hidden.shape[-1])[flat_positions][None]  # [1, S, d]
    target_logprobs, hits = chunked_target_scores(picked, output_kernel(cfg, params), targets[None], chunk=chunk,
                                                  precision=matmul_precision(cfg))
    return target_logprobs[0], hits[0]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _resolve_max_length(cfg: LlamaConfig, max_length: int | None) -> int:
    length = cfg.max_position_embeddings if max_length is None else int(max_length)
    if length < 1:
        raise ValueError(f"max_length must be >= 1, got {length}")
    return length


def _model_inputs(
    requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int
) -> dict[int, tuple[list[int], list[int], int]]:
    """(model input, next tokens, number of scored last positions) of each request with a continuation."""
    inputs: dict[int, tuple[list[int], list[int], int]] = {}
    for index, (context_ids, continuation_ids) in enumerate(requests):
        if len(context_ids) == 0:
            raise ValueError(f"request {index}: the context has no tokens; start it with BOS or a prefix token")
        if len(continuation_ids) > max_length:
            raise ValueError(
                f"request {index}: the continuation has {len(continuation_ids)} tokens, more than "
                f"max_length={max_length}"
            )
        if len(continuation_ids) == 0:
            continue
        window = [int(t) for t in (*context_ids, *continuation_ids)][-(max_length + 1):]
        inputs[index] = (window[:-1], window[1:], len(continuation_ids))
    return inputs


def pack_segments(lengths: Sequence[int], pack_length: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """Rows `(row_length, [(segment index, offset), ...])` holding every segment once.

    Segments are placed longest first (ties by index) into the first of the `OPEN_ROWS` most recently
    opened rows with room; a new row is `pack_length` long, or the next multiple of it for a longer
    segment. Deterministic: the same lengths always give the same rows.
    """
    if pack_length < 1:
        raise ValueError(f"pack_length must be >= 1, got {pack_length}")
    rows: list[tuple[int, list[tuple[int, int]]]] = []
    used: list[int] = []
    for segment in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[segment]
        for row in range(max(0, len(rows) - OPEN_ROWS), len(rows)):
            if used[row] + length <= rows[row][0]:
                rows[row][1].append((segment, used[row]))
                used[row] += length
                break
        else:
            rows.append((-(-length // pack_length) * pack_length, [(segment, 0)]))
            used.append(length)
    return rows


def _progress_bar(total: int, enabled: bool | str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    description = enabled if isinstance(enabled, str) else "log-likelihood"
    return tqdm(total=total, desc=description, unit="tok", unit_scale=True, dynamic_ncols=True)


def _score_plain(
    cfg: LlamaConfig, params: dict, lora: Any, inputs: dict[int, tuple[list[int], list[int], int]],
    batch_size: int, max_length: int, results: list[tuple[float, bool]], bar: Any,
) -> None:
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
                                      jnp.asarray(targets), jnp.asarray(scored), chunk=SCORE_CHUNK)
        totals, greedy = np.asarray(totals), np.asarray(greedy)
        for row, index in enumerate(chunk):
            results[index] = (float(totals[row]), bool(greedy[row]))
        if bar is not None:
            bar.update(sum(len(inputs[i][0]) for i in chunk))


def _score_packed(
    cfg: LlamaConfig, params: dict, lora: Any, inputs: dict[int, tuple[list[int], list[int], int]],
    batch_size: int, pack_length: int, results: list[tuple[float, bool]], bar: Any,
) -> None:
    # One segment per distinct model input; each request scores (offset in segment, target) entries of it.
    segment_of: dict[tuple[int, ...], int] = {}
    segments: list[list[int]] = []
    entries: list[list[tuple[int, int, int]]] = []  # per segment: (request, position in segment, target)
    for index, (inp, tgt, num_scored) in inputs.items():
        key = tuple(inp)
        segment = segment_of.setdefault(key, len(segments))
        if segment == len(segments):
            segments.append(inp)
            entries.append([])
        first = len(inp) - num_scored
        entries[segment].extend((index, position, tgt[position]) for position in range(first, len(inp)))
    totals = np.zeros(len(results), np.float64)
    greedy = np.ones(len(results), bool)
    rows = pack_segments([len(s) for s in segments], pack_length)
    by_length: dict[int, list[list[tuple[int, int]]]] = {}
    for row_length, placed in rows:
        by_length.setdefault(row_length, []).append(placed)
    budget = batch_size * pack_length
    for row_length in sorted(by_length, reverse=True):
        group = by_length[row_length]
        rows_per_pass = max(1, budget // row_length)
        for start in range(0, len(group), rows_per_pass):
            chunk = group[start:start + rows_per_pass]
            num_rows = min(rows_per_pass, _pow2(len(chunk)))
            tokens = np.zeros((num_rows, row_length), np.int32)
            segment_ids = np.zeros((num_rows, row_length), np.int32)
            positions = np.zeros((num_rows, row_length), np.int32)
            requests, flat, targets = [], [], []
            for row, placed in enumerate(chunk):
                for number, (segment, offset) in enumerate(placed, start=1):
                    inp = segments[segment]
                    tokens[row, offset:offset + len(inp)] = inp
                    segment_ids[row, offset:offset + len(inp)] = number
                    positions[row, offset:offset + len(inp)] = np.arange(len(inp))
                    for index, position, target in entries[segment]:
                        requests.append(index)
                        flat.append(row * row_length + offset + position)
                        targets.append(target)
            num_scored = max(MIN_SCORED_BUCKET, _pow2(len(flat)))
            flat_positions = np.zeros(num_scored, np.int32)
            flat_positions[:len(flat)] = flat
            target_ids = np.zeros(num_scored, np.int32)
            target_ids[:len(targets)] = targets
            hidden = forward_hidden(cfg, params, jnp.asarray(tokens), lora, segment_ids=jnp.asarray(segment_ids),
                                    positions=jnp.asarray(positions))
            logprobs, hits = _score_positions(cfg, params, hidden, jnp.asarray(flat_positions),
                                              jnp.asarray(target_ids), chunk=SCORE_CHUNK)
            logprobs = np.asarray(logprobs, np.float64)[:len(flat)]
            hits = np.asarray(hits)[:len(flat)]
            owners = np.asarray(requests, np.int64)
            np.add.at(totals, owners, logprobs)
            np.logical_and.at(greedy, owners, hits)
            if bar is not None:
                bar.update(int(np.count_nonzero(segment_ids)))
    for index in inputs:
        results[index] = (float(totals[index]), bool(greedy[index]))


def loglikelihood_tokens(
    cfg: LlamaConfig,
    params: dict,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    lora: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    pack_length: int | None = None,
    packed: bool = True,
    progress: bool | str = False,
) -> list[tuple[float, bool]]:
    """(summed log-probability, is_greedy) of each tokenized (context_ids, continuation_ids) request.

    The context must hold at least one token (e.g. BOS); an empty continuation scores (0.0, True).
    max_length: the most tokens the model reads per request (default `cfg.max_position_embeddings`);
    longer requests lose tokens from the left. A continuation longer than `max_length` is an error.
    batch_size: rows of `pack_length` tokens per forward pass (packed), or requests per pass (plain).
    pack_length: tokens per packed row (default `min(DEFAULT_PACK_LENGTH, max_length)`).
    packed: identical inputs run once and short inputs share rows (see the module docstring); False is
    the plain path, one padded row per request. progress: a tqdm bar over the model's input tokens (a
    string names the bar).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = _resolve_max_length(cfg, max_length)
    pack_length = min(DEFAULT_PACK_LENGTH, max_length) if pack_length is None else int(pack_length)
    results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    inputs = _model_inputs(requests, max_length)
    if not inputs:
        return results
    if packed:
        total = sum(len(inp) for inp in {tuple(inp) for inp, _, _ in inputs.values()})
    else:
        total = sum(len(inp) for inp, _, _ in inputs.values())
    bar = _progress_bar(total, progress)
    try:
        if packed:
            _score_packed(cfg, params, lora, inputs, batch_size, pack_length, results, bar)
        else:
            _score_plain(cfg, params, lora, inputs, batch_size, max_length, results, bar)
    finally:
        if bar is not None:
            bar.close()
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
    pack_length: int | None = None,
    packed: bool = True,
    progress: bool | str = False,
) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is_greedy) for each (context, continuation) text pair."""
    encoded = [encode_request(tokenizer, context, continuation) for context, continuation in requests]
    return loglikelihood_tokens(cfg, params, encoded, lora=lora, batch_size=batch_size, max_length=max_length,
                                pack_length=pack_length, packed=packed, progress=progress)


def rolling_token_counts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[int]:
    """How many tokens `loglikelihood_rolling` predicts for each text (its length without BOS)."""
    return [len(tokenizer.encode(text)) for text in texts]


def loglikelihood_rolling(
    cfg: LlamaConfig,
    params: dict,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    lora: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    pack_length: int | None = None,
    packed: bool = True,
    progress: bool | str = False,
) -> list[float]:
    """Summed log-probability of every token of each text given the prefix token, in rolling windows of
    `max_length` (lm-eval's `loglikelihood_rolling`, see the module docstring)."""
    max_length = _resolve_max_length(cfg, max_length)
    owners: list[int] = []
    windows: list[tuple[list[int], list[int]]] = []
    for index, text in enumerate(texts):
        for window in rolling_windows(tokenizer.encode(text), prefix_token_id(tokenizer), max_length):
            owners.append(index)
            windows.append(window)
    scores = loglikelihood_tokens(cfg, params, windows, lora=lora, batch_size=batch_size, max_length=max_length,
                                  pack_length=pack_length, packed=packed, progress=progress)
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


def multiple_choice_hits(rows: Sequence[Mapping], loglikelihoods: Sequence[Sequence[float]]) -> dict[str, list[int]]:
    """Per-row 0/1 hits of acc, acc_norm (per character) and acc_bytes (per UTF-8 byte) from per-choice scores."""
    if len(rows) != len(loglikelihoods):
        raise ValueError(f"{len(rows)} rows but {len(loglikelihoods)} lists of log-likelihoods")
    hits: dict[str, list[int]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for index, (row, scores) in enumerate(zip(rows, loglikelihoods, strict=True)):
        choices = row["choices"]
        if len(scores) != len(choices):
            raise ValueError(f"row {index}: {len(choices)} choices but {len(scores)} log-likelihoods")
        scores = np.asarray(scores, np.float64)
        chars = np.array([len(choice) for choice in choices], np.float64)
        utf8 = np.array([len(choice.encode("utf-8")) for choice in choices], np.float64)
        gold = row["gold"]
        hits["acc"].append(int(np.argmax(scores) == gold))
        hits["acc_norm"].append(int(np.argmax(scores / chars) == gold))
        hits["acc_bytes"].append(int(np.argmax(scores / utf8) == gold))
    return hits


def aggregate_multiple_choice(rows: Sequence[Mapping], loglikelihoods: Sequence[Sequence[float]]) -> dict:
    """acc, acc_norm (per character) and acc_bytes (per UTF-8 byte), averaged over rows, from per-choice scores."""
    if not rows:
        raise ValueError("no rows to aggregate")
    hits = multiple_choice_hits(rows, loglikelihoods)
    result: dict[str, Any] = {name: sum(values) / len(rows) for name, values in hits.items()}
    result["num_rows"] = len(rows)
    return result


def multiple_choice_loglikelihoods(
    cfg: LlamaConfig,
    params: dict,
    tokenizer: Tokenizer,
    rows: Sequence[Mapping],
    *,
    lora: Any = None,
    target_delimiter: str = " ",
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    packed: bool = True,
    progress: bool | str = False,
) -> list[list[float]]:
    """log P(target_delimiter + choice | context) for every choice of every (validated) row."""
    rows = [validate_multiple_choice_row(row, f"row {index}") for index, row in enumerate(rows)]
    if not rows:
        raise MultipleChoiceDataError("no rows to score")
    scores = loglikelihood(cfg, params, tokenizer, multiple_choice_requests(rows, target_delimiter), lora=lora,
                           batch_size=batch_size, max_length=max_length, packed=packed, progress=progress)
    per_row, offset = [], 0
    for row in rows:
        per_row.append([value for value, _ in scores[offset:offset + len(row["choices"])]])
        offset += len(row["choices"])
    return per_row


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
    packed: bool = True,
    progress: bool | str = False,
) -> dict:
    """Score rows `{"context", "choices", "gold"}`: {"acc", "acc_norm", "acc_bytes", "num_rows"}."""
    per_row = multiple_choice_loglikelihoods(cfg, params, tokenizer, rows, lora=lora,
                                             target_delimiter=target_delimiter, batch_size=batch_size,
                                             max_length=max_length, packed=packed, progress=progress)
    return aggregate_multiple_choice(rows, per_row)

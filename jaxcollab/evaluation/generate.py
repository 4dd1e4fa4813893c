"""Batched greedy decoding with a KV cache: one jitted prefill plus a jitted decode loop.

`greedy(cfg, params, prompts, max_new_tokens, eos_id=None, lora=None)` takes prompts of different
lengths as token-id lists and returns the new tokens of each (up to and including its first EOS).

How it runs:
- Prompts are sorted by length and cut into batches; each batch is left-padded to a length bucket
  (a multiple of `length_bucket`) and to a power-of-two batch size, so a whole evaluation compiles a
  handful of shapes, not one per prompt. Padding rows are marked finished from the start.
- Prefill runs the prompt through the model once, writing keys/values into cache slots [0, P) and
  taking the logits of the last position only. RoPE positions count real tokens (cumsum of the mask
  minus one), as transformers' `generate` does for left-padded batches.
- The decode loop (`jax.lax.while_loop`) feeds one token per step, writes its keys/values at slot
  P + i - 1, and attends over every valid slot up to it. It stops when every row has produced an EOS
  or after `max_new_tokens` tokens. Rows that finished keep computing (fixed shapes) but their outputs
  are discarded.
- The layer weights (and LoRA factors) are split out of their stacked [L, ...] arrays once per call
  (`llama.unstack_layers`), so prefill and decode run the layers unrolled, each matmul reading its kernel
  in place; a scan over the stack would copy every kernel out of it on every step. The split holds a
  second copy of the layer weights while decoding, so by default it is made only where every device has
  room for it (always on CPU); `unstack_layers=False` / `True` decides explicitly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcollab.model import llama
from jaxcollab.model.config import LlamaConfig
from jaxcollab.model.llama import forward_with_cache, init_cache


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _first_max(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` (the first maximum; the first NaN if there is one) as two plain reductions:
    XLA:CPU runs argmax's paired (value, index) reduction about 3x slower than a max and a min."""
    best = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == best) | jnp.isnan(logits)
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, ids, logits.shape[-1]), axis=-1)


_split_layers = jax.jit(llama.unstack_layers, static_argnames="num_layers")


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _generate_batch(
    cfg: LlamaConfig,
    params: dict,
    lora: Any,
    tokens: jax.Array,  # [B, P] left-padded
    prompt_mask: jax.Array,  # [B, P] 1 for real tokens
    finished: jax.Array,  # [B] rows that are padding
    eos_ids: jax.Array,  # [E] (E >= 1; -1 never matches)
    max_new_tokens: int,
) -> jax.Array:
    batch, prompt_len = tokens.shape
    slots = prompt_len + max_new_tokens
    cache = init_cache(cfg, batch, slots)
    prompt_mask = prompt_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    key_valid = jnp.concatenate([prompt_mask, jnp.zeros((batch, max_new_tokens), bool)], axis=1)
    slot_ids = jnp.arange(slots)
    causal = slot_ids[None, :] <= jnp.arange(prompt_len)[:, None]  # [P, S]
    mask = key_valid[:, None, None, :] & causal[None, None]
    logits, cache = forward_with_cache(cfg, params, tokens, positions, mask, cache, jnp.int32(0), lora,
                                       last_only=True)
    first = _first_max(logits[:, -1])
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = finished | jnp.isin(first, eos_ids)
    lengths = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)

    def keep_going(carry: tuple) -> jax.Array:
        step, _, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode(carry: tuple) -> tuple:
        step, cache, token, key_valid, out, done = carry
        slot = prompt_len + step - 1
        key_valid = key_valid.at[:, slot].set(True)
        step_mask = (key_valid & (slot_ids <= slot)[None, :])[:, None, None, :]
        position = (lengths + step - 1)[:, None]
        logits, cache = forward_with_cache(cfg, params, token[:, None], position, step_mask, cache, slot, lora)
        nxt = _first_max(logits[:, 0])
        out = out.at[:, step].set(jnp.where(done, 0, nxt))
        done = done | jnp.isin(nxt, eos_ids)
        return step + 1, cache, nxt, key_valid, out, done

    carry = (jnp.int32(1), cache, first, key_valid, out, done)
    *_, out, _ = jax.lax.while_loop(keep_going, decode, carry)
    return out


def room_for_layer_copy(params: dict, headroom: float = 0.8) -> bool:
    """Whether every device holding part of the stacked layer weights has free memory for a second copy of
    its part (with `headroom`: at most that fraction of the free bytes). Devices that report no memory
    statistics (the CPU backend) count as having room."""
    need: dict[Any, int] = {}
    for leaf in jax.tree.leaves(params.get("layers", {})):
        for shard in getattr(leaf, "addressable_shards", []):
            need[shard.device] = need.get(shard.device, 0) + shard.data.nbytes
    for device, nbytes in need.items():
        stats = device.memory_stats()
        if stats and "bytes_limit" in stats:
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            if nbytes > headroom * free:
                return False
    return True


def greedy(
    cfg: LlamaConfig,
    params: dict,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None = None,
    lora: Any = None,
    *,
    batch_size: int = 32,
    length_bucket: int = 64,
    pad_id: int = 0,
    unstack_layers: bool | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt: its new tokens, up to and including the first EOS.

    eos_id: one id or several (Llama 3 instruct models stop at several); None never stops early.
    unstack_layers: decode from per-layer copies of the layer weights (faster; holds them twice while
    decoding) or, False, from the stacked weights; None: copy where the devices have room for it.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    eos = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    eos_ids = jnp.asarray(eos or [-1], jnp.int32)
    if unstack_layers is None:
        unstack_layers = room_for_layer_copy(params)
    if unstack_layers:
        params = _split_layers(params, num_layers=cfg.num_layers)
        if lora is not None:
            lora = dataclasses.replace(lora, weights=_split_layers(lora.weights, num_layers=cfg.num_layers))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = _pow2(len(chunk))
        length = _bucket(max(len(prompts[i]) for i in chunk), length_bucket)
        tokens = np.full((rows, length), pad_id, np.int32)
        prompt_mask = np.zeros((rows, length), np.int32)
        for row, index in enumerate(chunk):
            ids = prompts[index]
            tokens[row, length - len(ids) :] = ids
            prompt_mask[row, length - len(ids) :] = 1
        finished = np.arange(rows) >= len(chunk)
        out = np.asarray(_generate_batch(cfg, params, lora, jnp.asarray(tokens), jnp.asarray(prompt_mask),
                                         jnp.asarray(finished), eos_ids, max_new_tokens))
        for row, index in enumerate(chunk):
            generated = out[row].tolist()
            stops = [k for k, token in enumerate(generated) if token in eos]
            results[index] = generated[: stops[0] + 1] if stops else generated
    return results

"""The LM head and the next-token cross-entropy (or scores), computed a chunk of positions at a time.

The whole float32 logits of a batch are [B, T, V]: 1 GiB per 2048-token sequence for Llama 3's 128,256-token
vocabulary, as much again for their gradient. `chunked_token_cross_entropy` never holds more than
[B, chunk, V] of them. Its custom VJP computes the gradients while it computes the loss: for each chunk,
logits -> log-sum-exp -> (softmax - one-hot) * weight -> the hidden states' gradient and, when the head
is trained, the head's gradient, accumulated over chunks. The backward pass then only scales what was
kept ([B, T, d] and, if the head is trained, [d, V]) by the loss's cotangent, so nothing is computed twice.
A frozen head (LoRA) is detected through `symbolic_zeros` and its gradient matmul is skipped.

The gradient of the logits is cast to the compute dtype before its two matmuls, as a bf16 model in torch
does (the logits are bf16 there, upcast only inside the loss).

`chunked_target_scores` is the forward-only counterpart for evaluation: each position's log-probability
of a given target and whether the target is the argmax, again [B, chunk, V] logits at a time.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal

from jaxcollab.model.llama import constrain

Array = jax.Array


def chunked_token_cross_entropy(
    hidden: Array, kernel: Array, tokens: Array, loss_mask: Array, *, chunk: int, precision: Any = None
) -> tuple[Array, Array]:
    """(sum of -log p(token_t | tokens_<t) over positions with loss_mask[t] = 1, number of such tokens).

    hidden: [B, T, d] final-normed hidden states in the compute dtype (`model.llama.forward_hidden`).
    kernel: [d, V] LM head in the compute dtype (`model.llama.output_kernel`).
    chunk: positions per chunk; T is padded up to a multiple of it (padding carries weight 0).
    The same value as `train.token_cross_entropy(hidden @ kernel, tokens, loss_mask)`.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, t, _ = hidden.shape
    weights = jnp.pad(loss_mask[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    targets = jnp.pad(tokens[:, 1:].astype(jnp.int32), ((0, 0), (0, 1)))
    chunk = min(chunk, t)
    padded = -(-t // chunk) * chunk
    if padded != t:
        extra = ((0, 0), (0, padded - t))
        hidden = jnp.pad(hidden, (*extra, (0, 0)))
        weights, targets = jnp.pad(weights, extra), jnp.pad(targets, extra)
    total = _weighted_nll_sum(hidden, kernel, targets, weights, chunk, precision)
    return total, jnp.sum(weights)


def chunked_target_scores(
    hidden: Array, kernel: Array, targets: Array, *, chunk: int, precision: Any = None
) -> tuple[Array, Array]:
    """(log p(targets[b, t]) at each position [B, T] float32, whether the target is the argmax [B, T] bool).

    hidden [B, T, d] and kernel [d, V] as in `chunked_token_cross_entropy`; targets [B, T] int. The argmax
    is the first largest logit, as `jnp.argmax`.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, t, _ = hidden.shape
    chunk = min(chunk, t)
    padded = -(-t // chunk) * chunk
    targets = targets.astype(jnp.int32)
    if padded != t:
        hidden = jnp.pad(hidden, ((0, 0), (0, padded - t), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padded - t)))

    def body(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        logprobs, hits = carry
        tgt = _chunk(targets, i, chunk)
        logits = _chunk_logits(_chunk(hidden, i, chunk), kernel, precision)
        nll, _ = _chunk_nll(logits, tgt)
        hit = jnp.argmax(logits, axis=-1) == tgt
        logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, -nll, i * chunk, axis=1)
        return logprobs, jax.lax.dynamic_update_slice_in_dim(hits, hit, i * chunk, axis=1)

    init = (jnp.zeros((b, padded), jnp.float32), jnp.zeros((b, padded), bool))
    logprobs, hits = jax.lax.fori_loop(0, padded // chunk, body, init)
    return logprobs[:, :t], hits[:, :t]


def _chunk(x: Array, index: Array, chunk: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, index * chunk, chunk, axis=1)


def _chunk_logits(h: Array, kernel: Array, precision: Any) -> Array:
    logits = jnp.einsum("bcd,dv->bcv", h, kernel, precision=precision, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "act_vocab"))


def _chunk_nll(logits: Array, targets: Array) -> tuple[Array, Array]:
    """(-log softmax at the targets [B, C], log-sum-exp [B, C]); the target logit is picked by comparison."""
    vocab_ids = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    target_logits = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - target_logits, lse


def _masked_sum(nll: Array, weights: Array) -> Array:
    return jnp.sum(jnp.where(weights > 0, nll, 0.0) * weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _weighted_nll_sum(hidden: Array, kernel: Array, targets: Array, weights: Array, chunk: int,
                      precision: Any) -> Array:
    def body(i: Array, total: Array) -> Array:
        nll, _ = _chunk_nll(_chunk_logits(_chunk(hidden, i, chunk), kernel, precision), _chunk(targets, i, chunk))
        return total + _masked_sum(nll, _chunk(weights, i, chunk))

    return jax.lax.fori_loop(0, hidden.shape[1] // chunk, body, jnp.zeros((), jnp.float32))


def _weighted_nll_sum_fwd(hidden: CustomVJPPrimal, kernel: CustomVJPPrimal, targets: CustomVJPPrimal,
                          weights: CustomVJPPrimal, chunk: int, precision: Any) -> tuple[Array, tuple]:
    h_all, w, t_all, wt_all = hidden.value, kernel.value, targets.value, weights.value
    want_dh, want_dw = hidden.perturbed, kernel.perturbed
    vocab_ids = jnp.arange(w.shape[-1], dtype=t_all.dtype)

    def body(i: Array, carry: tuple) -> tuple:
        total, dh_all, dw_t = carry
        h, tgt, wt = _chunk(h_all, i, chunk), _chunk(t_all, i, chunk), _chunk(wt_all, i, chunk)
        logits = _chunk_logits(h, w, precision)
        nll, lse = _chunk_nll(logits, tgt)
        total = total + _masked_sum(nll, wt)
        # d(sum wt * nll)/d logits = wt * (softmax - one-hot), in the compute dtype for the matmuls.
        probs = jnp.exp(logits - lse[..., None])
        g = (jnp.where(vocab_ids == tgt[..., None], probs - 1.0, probs) * wt[..., None]).astype(h.dtype)
        if want_dh:
            dh = jnp.einsum("bcv,dv->bcd", g, w, precision=precision, preferred_element_type=jnp.float32)
            dh_all = jax.lax.dynamic_update_slice_in_dim(dh_all, dh.astype(dh_all.dtype), i * chunk, axis=1)
        if want_dw:  # accumulated as [V, d] (XLA:CPU then transposes h, not the wider g; see llama.project)
            dw_t = dw_t + jnp.einsum("bcv,bcd->vd", g, h, precision=precision, preferred_element_type=jnp.float32)
        return total, dh_all, dw_t

    init = (jnp.zeros((), jnp.float32),
            jnp.zeros(h_all.shape, h_all.dtype) if want_dh else None,
            jnp.zeros(w.shape[::-1], jnp.float32) if want_dw else None)
    total, dh_all, dw_t = jax.lax.fori_loop(0, h_all.shape[1] // chunk, body, init)
    dw = dw_t.T.astype(w.dtype) if want_dw else None
    return total, (dh_all, dw)


def _weighted_nll_sum_bwd(chunk: int, precision: Any, saved: tuple, cotangent: Array) -> tuple:
    dh, dw = saved
    scale = lambda g: None if g is None else (g * cotangent).astype(g.dtype)  # noqa: E731
    return scale(dh), scale(dw), None, None


_weighted_nll_sum.defvjp(_weighted_nll_sum_fwd, _weighted_nll_sum_bwd, symbolic_zeros=True)

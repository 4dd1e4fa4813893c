"""Llama 3 in Flax (linen): embeddings, RMSNorm, grouped-query attention with RoPE, SwiGLU, scanned layers.

Design:
- Parameters are a plain nested dict whose names mirror Hugging Face's module names, so the mapping to
  checkpoints is a table (see `hf.py`): `embed_tokens/embedding [V, d]`, `layers/self_attn/q_proj/kernel
  [L, d, H*hd]` (a Flax kernel is the transpose of the torch weight), ..., `norm/scale [d]`,
  `lm_head/kernel [d, V]` (absent when the embeddings are tied).
- The decoder layer is compiled once and scanned over depth (`nn.scan`); its parameters carry a leading
  `layers` axis. The layer can be rematerialised with a named policy (`LlamaConfig.remat_policy`).
- Storage dtype (`param_dtype`) and compute dtype (`dtype`) are independent; norms, RoPE, softmax and the
  logits are computed in float32 whatever the compute dtype.
- Every parameter carries logical axis names; activations are constrained with logical names too when a
  mesh is active (`jax.set_mesh`). The names become mesh axes only through `sharding.LOGICAL_RULES`.
- Attention goes through `jax.nn.dot_product_attention`, so fused kernels are used where the platform has
  them; padding masks, packed sequences (segment ids) and explicit positions are supported.
- Decoding keeps a KV cache ([L, B, kv_heads, S, head_dim]) that travels through the layers as part of
  the carry: each layer writes its new keys/values in place at (layer, cache_index) and attends over its
  own slice under an explicit mask, so a decode step writes one slot per layer instead of copying the
  cache (see `forward_with_cache` and `jaxcollab.evaluation.generate`). For decoding, the layers can also
  run unrolled on per-layer weights (`unstack_layers`, `Llama(unrolled=True)`), which spares XLA the copy
  of every kernel out of the stack on every step.
- With `cfg.num_experts > 0` each layer's MLP is a Mixtral mixture of experts (`MoeMlp`): a bias-free
  router, softmax over experts, top-k, renormalised weights; only the chosen experts run
  (`jax.lax.ragged_dot` over tokens grouped by expert), or all of them with `moe_impl="dense"`.
  Router logits and each layer's input are sown as `intermediates` (see `forward_with_aux`).
- LoRA is an overlay, never a weight update: an adapter's factors arrive as the variable collection
  `lora` (mirroring the parameter tree, stacked over layers like it), and each targeted `Linear` adds
  `scaling * dropout(x) A^T B^T` to `x W`. `W + BA` is never formed. See `jaxcollab.lora`.
- Every projection (`x W` and LoRA's `h B^T`) goes through `project`, whose VJP computes a widening
  kernel's gradient as (g^T x)^T so that XLA:CPU transposes the narrower operand (see `project`).
- `forward_hidden` stops before the LM head (final-normed [B, T, d]); with `output_kernel` ([d, V]) it
  feeds the chunked head + loss of `head_loss.py`, which never holds the whole [B, T, V] logits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType

from jaxcollab.model.config import LlamaConfig
from jaxcollab.model.sharding import LOGICAL_RULES, Rules, logical_to_spec, tree_shardings

Array = jax.Array
KVCache = tuple[Array, Array]  # keys and values, [L, B, kv_heads, S, head_dim]
_INIT = nn.initializers.normal(stddev=0.02)  # what transformers uses (initializer_range=0.02)

_PRECISION = {"default": None, "high": jax.lax.Precision.HIGH, "highest": jax.lax.Precision.HIGHEST}

REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
}


class AdapterLike(Protocol):
    """What `forward` needs of a LoRA adapter (see `jaxcollab.lora.LoraAdapter`)."""

    weights: dict
    scaling: float
    dropout: float


@dataclass(frozen=True)
class LoraRuntime:
    """Static LoRA settings of one forward pass: output scaling and dropout (active only in training)."""

    scaling: float
    dropout: float = 0.0
    deterministic: bool = True


def constrain(x: Array, logical: tuple[str | None, ...]) -> Array:
    """Sharding constraint from logical names, applied only under an active auto-sharded mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t != AxisType.Auto for t in mesh.axis_types):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, LOGICAL_RULES, x.shape, mesh))


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim / 2] in float32, with llama3 scaling when configured."""
    dim = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(
        np.float32
    )
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = (2 * np.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq).astype(np.float32)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate-half RoPE (the Hugging Face layout) on x [B, T, N, hd] at integer positions [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, hd/2]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def project(x: Array, w: Array, precision: Any = None, out_dtype: Any = None) -> Array:
    """x [..., in] @ w [in, out], with a VJP that picks the orientation of w's gradient.

    The kernel gradient is x^T g over all tokens. XLA:CPU feeds its matmuls operands with the contracted
    (token) axis last and so writes one of x and g transposed first; left to autodiff it transposes g,
    the larger one whenever out > in ([tokens, 14336] for Llama 3 8B's gate and up projections, the whole
    [tokens, vocab] logits gradient for the LM head, every [tokens, out] LoRA B input gradient). This VJP
    computes (g^T x)^T in that case, so x is the one transposed and the [out, in] result is flipped after.
    Profiled on the 56M-parameter benchmark model this removed about 0.6 s of transposing copies from a
    4.2 s LoRA loss-and-gradient and from a 4.7 s full fine-tuning one (see benchmarks/RESULTS.md).
    """
    return jnp.einsum("...i,io->...o", x, w, precision=precision, preferred_element_type=out_dtype)


def _project_fwd(x: Array, w: Array, precision: Any, out_dtype: Any) -> tuple[Array, tuple[Array, Array]]:
    return project(x, w, precision, out_dtype), (x, w)


def _project_bwd(precision: Any, out_dtype: Any, saved: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, w = saved
    n_in, n_out = w.shape
    g = g.astype(x.dtype)  # float32 logits' gradient -> compute dtype, as torch's bf16 head sees it
    dx = jnp.einsum("...o,io->...i", g, w, precision=precision, preferred_element_type=jnp.float32)
    rows, grads = x.reshape(-1, n_in), g.reshape(-1, n_out)
    if n_out > n_in:
        dw = jnp.einsum("no,ni->oi", grads, rows, precision=precision, preferred_element_type=jnp.float32).T
    else:
        dw = jnp.einsum("ni,no->io", rows, grads, precision=precision, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


project.defvjp(_project_fwd, _project_bwd)


class Linear(nn.Module):
    """Bias-free dense layer with a logically named [in, out] kernel, computed in the compute dtype.

    With LoRA factors in the `lora` collection (`lora_A` [r, in], `lora_B` [out, r]) it returns
    `x W + scaling * dropout(x) A^T B^T`.
    """

    features: int
    axes: tuple[str, str]
    cfg: LlamaConfig
    lora: LoraRuntime | None = None
    out_dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(_INIT, self.axes), (x.shape[-1], self.features),
            self.cfg.storage_dtype,
        )
        dtype = self.cfg.compute_dtype
        precision = _PRECISION[self.cfg.precision]
        x = x.astype(dtype)
        y = project(x, kernel.astype(dtype), precision, self.out_dtype)
        if self.lora is not None and self.has_variable("lora", "lora_A"):
            a = self.get_variable("lora", "lora_A").astype(dtype)
            b = self.get_variable("lora", "lora_B").astype(dtype)
            if self.lora.dropout > 0.0:
                x = nn.Dropout(self.lora.dropout, deterministic=self.lora.deterministic)(x)
            h = jnp.einsum("...i,ri->...r", x, a, precision=precision)
            delta = project(h, b.T, precision, self.out_dtype)
            y = y + (self.lora.scaling * delta).astype(y.dtype)
        return y


class RMSNorm(nn.Module):
    """Root-mean-square norm, normalised in float32 and scaled in the compute dtype (as transformers)."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],),
            self.cfg.storage_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        dtype = self.cfg.compute_dtype
        return normed.astype(dtype) * scale.astype(dtype)


class Embed(nn.Module):
    """Token embedding table [V, d]; rows are gathered first, then cast to the compute dtype."""

    cfg: LlamaConfig

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
            (self.cfg.vocab_size, self.cfg.hidden_size), self.cfg.storage_dtype,
        )

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(self.embedding, tokens, axis=0).astype(self.cfg.compute_dtype)

    def attend(self, x: Array) -> Array:
        """Tied output head: x [.., d] @ embedding.T, accumulated in float32."""
        dtype = self.cfg.compute_dtype
        return jnp.einsum(
            "...d,vd->...v", x.astype(dtype), self.embedding.astype(dtype),
            precision=_PRECISION[self.cfg.precision], preferred_element_type=jnp.float32,
        )


def _attend_to_cache(q: Array, keys: Array, values: Array, mask: Array) -> Array:
    """Grouped-query attention of q [B, T, H, hd] over a layer's cache slots keys/values [B, K, S, hd] under
    `mask` [B, 1, T, S]. The head-major cache lets both matmuls read the cache as it lies in memory (no
    per-step transpose of every slot), and the queries of a KV head's group are its rows ([B, K, G*T, hd]),
    so each matmul is one plain batched matmul per (batch, KV head); logits and softmax are float32, as
    `jax.nn.dot_product_attention`."""
    b, t, h, hd = q.shape
    kv = keys.shape[1]
    group = h // kv
    rows = q.reshape(b, t, kv, group, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, group * t, hd)
    logits = jnp.einsum("bkrd,bksd->bkrs", rows, keys, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, kv, group, t, -1)
    logits = jnp.where(mask[:, :, None], logits * (hd**-0.5), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype).reshape(b, kv, group * t, -1)
    out = jnp.einsum("bkrs,bksd->bkrd", probs, values).reshape(b, kv, group, t, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE."""

    cfg: LlamaConfig
    lora: LoraRuntime | None = None

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, mask: Array | None, cache: KVCache | None = None,
        cache_index: Array | None = None, layer: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Without a cache: causal attention (plus `mask`). With one (all layers' [L, B, K, S, hd]): this
        layer's keys/values are written at (layer, cache_index) and every query attends over the layer's
        slots under `mask` [B, 1, T, S] alone."""
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.head_dim
        q = Linear(cfg.num_heads * hd, ("embed", "q_heads"), cfg, self.lora, name="q_proj")(x)
        k = Linear(cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, self.lora, name="k_proj")(x)
        v = Linear(cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, self.lora, name="v_proj")(x)
        q = checkpoint_name(q, "qkv_proj").reshape(b, t, cfg.num_heads, hd)
        k = checkpoint_name(k, "qkv_proj").reshape(b, t, cfg.num_kv_heads, hd)
        v = checkpoint_name(v, "qkv_proj").reshape(b, t, cfg.num_kv_heads, hd)
        inv_freq = rope_inv_freq(cfg)
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "act_heads", "act_head_dim"))
        k = constrain(apply_rope(k, positions, inv_freq), ("batch", "length", "act_kv_heads", "act_head_dim"))
        if cache is None:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=cfg.attention_impl)
        else:
            start = (layer, 0, 0, cache_index, 0)
            cache = tuple(  # type: ignore[assignment]
                jax.lax.dynamic_update_slice(c, new.transpose(0, 2, 1, 3)[None].astype(c.dtype), start)
                for c, new in zip(cache, (k, v), strict=True))
            keys, values = (jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False).astype(q.dtype) for c in cache)
            out = _attend_to_cache(q, keys, values, mask)
        out = out.reshape(b, t, cfg.num_heads * hd)
        return Linear(cfg.hidden_size, ("q_heads", "embed"), cfg, self.lora, name="o_proj")(out), cache


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: LlamaConfig
    lora: LoraRuntime | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        gate = Linear(cfg.intermediate_size, ("embed", "mlp"), cfg, self.lora, name="gate_proj")(x)
        up = Linear(cfg.intermediate_size, ("embed", "mlp"), cfg, self.lora, name="up_proj")(x)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return Linear(cfg.hidden_size, ("mlp", "embed"), cfg, self.lora, name="down_proj")(hidden)


class ExpertKernels(nn.Module):
    """The stacked [E, in, out] kernels of one projection of every expert."""

    num_experts: int
    shape: tuple[int, int]
    axes: tuple[str, str]
    cfg: LlamaConfig

    @nn.compact
    def __call__(self) -> Array:
        return self.param("kernel", nn.with_logical_partitioning(_INIT, ("exp", *self.axes)),
                          (self.num_experts, *self.shape), self.cfg.storage_dtype)


def route(logits: Array, top_k: int, always_on: int | None = None) -> tuple[Array, Array]:
    """Mixtral routing: softmax over experts, the top-k, weights renormalised to sum to one.

    logits [..., E] -> (weights [..., k], expert ids [..., k]). With `always_on`, that expert is always
    among the k (the other k-1 are the best of the rest), weights renormalised over the chosen ones.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    scores = probs if always_on is None else probs.at[..., always_on].add(2.0)
    _, ids = jax.lax.top_k(scores, top_k)
    weights = jnp.take_along_axis(probs, ids, axis=-1)
    return weights / jnp.sum(weights, axis=-1, keepdims=True), ids


class MoeMlp(nn.Module):
    """Mixture of SwiGLU experts behind a top-k router (the Mixtral sparse MoE block)."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        e, k, d, f = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.intermediate_size
        logits = Linear(e, ("embed", "exp"), cfg, out_dtype=jnp.float32, name="router")(x)
        self.sow("intermediates", "router_logits", logits)
        weights, ids = route(logits, k, cfg.always_on_expert)
        dtype = cfg.compute_dtype
        gate = ExpertKernels(e, (d, f), ("embed", "mlp"), cfg, name="gate_proj")().astype(dtype)
        up = ExpertKernels(e, (d, f), ("embed", "mlp"), cfg, name="up_proj")().astype(dtype)
        down = ExpertKernels(e, (f, d), ("mlp", "embed"), cfg, name="down_proj")().astype(dtype)
        x = x.astype(dtype)
        if cfg.moe_impl == "dense" or k == e:
            return _experts_dense(x, weights, ids, gate, up, down, self.cfg)
        return _experts_sparse(x, weights, ids, gate, up, down, self.cfg)


def _experts_dense(x: Array, weights: Array, ids: Array, gate: Array, up: Array, down: Array,
                   cfg: LlamaConfig) -> Array:
    """Every expert on every token, combined with the routing weights (zero for unchosen experts)."""
    precision = _PRECISION[cfg.precision]
    hidden = jax.nn.silu(jnp.einsum("btd,edf->btef", x, gate, precision=precision)) * jnp.einsum(
        "btd,edf->btef", x, up, precision=precision)
    outputs = jnp.einsum("btef,efd->bted", hidden, down, precision=precision)
    dense_weights = jnp.sum(jax.nn.one_hot(ids, cfg.num_experts, dtype=jnp.float32) * weights[..., None], axis=-2)
    return jnp.einsum("bted,bte->btd", outputs, dense_weights.astype(outputs.dtype), precision=precision)


def _experts_sparse(x: Array, weights: Array, ids: Array, gate: Array, up: Array, down: Array,
                    cfg: LlamaConfig) -> Array:
    """Only the chosen experts: (token, choice) pairs grouped by expert and run as ragged matmuls."""
    b, t, d = x.shape
    k = ids.shape[-1]
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    token = order // k
    rows = x.reshape(b * t, d)[token]
    sizes = jnp.bincount(flat_ids, length=cfg.num_experts).astype(jnp.int32)
    precision = _PRECISION[cfg.precision]
    hidden = jax.nn.silu(jax.lax.ragged_dot(rows, gate, sizes, precision=precision)) * jax.lax.ragged_dot(
        rows, up, sizes, precision=precision)
    outputs = jax.lax.ragged_dot(hidden, down, sizes, precision=precision)
    outputs = outputs * weights.reshape(-1)[order][:, None].astype(outputs.dtype)
    return jnp.zeros((b * t, d), outputs.dtype).at[token].add(outputs).reshape(b, t, d)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residuals; the body of the layer scan."""

    cfg: LlamaConfig
    lora: LoraRuntime | None = None

    @nn.compact
    def __call__(
        self, carry: Array | tuple[Array, KVCache], positions: Array, mask: Array | None,
        layer: Array | None = None, cache_index: Array | None = None,
    ) -> tuple[Array | tuple[Array, KVCache], None]:
        """carry: the residual stream x, or (x, the KV cache of all layers) when decoding."""
        x, cache = carry if isinstance(carry, tuple) else (carry, None)
        self.sow("intermediates", "layer_inputs", x)
        h = RMSNorm(self.cfg, name="input_layernorm")(x)
        attended, cache = Attention(self.cfg, self.lora, name="self_attn")(h, positions, mask, cache, cache_index,
                                                                          layer)
        x = x + attended
        h = RMSNorm(self.cfg, name="post_attention_layernorm")(x)
        mlp = MoeMlp(self.cfg, name="mlp") if self.cfg.is_moe else Mlp(self.cfg, self.lora, name="mlp")
        x = constrain(x + mlp(h), ("batch", "length", "act_embed"))
        return (x if cache is None else (x, cache)), None


class Llama(nn.Module):
    """Token ids [B, T] -> float32 logits [B, T, V]."""

    cfg: LlamaConfig
    lora: LoraRuntime | None = None
    unrolled: bool = False  # layers as layers_0 .. layers_{L-1} (see `unstack_layers`) instead of a scan

    @nn.compact
    def __call__(
        self, tokens: Array, positions: Array, mask: Array | None, cache: KVCache | None = None,
        cache_index: Array | None = None, last_only: bool = False, final_hidden: bool = False,
    ) -> Array | tuple[Array, KVCache]:
        """Logits, or (logits, updated cache) when a cache is given; `last_only` keeps the last position.

        `final_hidden` returns the final-normed hidden states [B, T, d] (compute dtype) instead of logits.
        """
        cfg = self.cfg
        embed = Embed(cfg, name="embed_tokens")
        x = constrain(embed(tokens), ("batch", "length", "act_embed"))
        layer = DecoderLayer
        if cfg.remat_policy != "none":
            layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        cached = cache is not None
        if self.unrolled:
            carry: Any = (x, cache) if cached else x
            for i in range(cfg.num_layers):
                extra = (jnp.int32(i), cache_index) if cached else ()
                carry, _ = layer(cfg, self.lora, name=f"layers_{i}")(carry, positions, mask, *extra)
            x, cache = carry if cached else (carry, None)
        else:  # compiled once and scanned over depth; parameters stacked on a `layers` axis
            layers = nn.scan(
                layer,
                variable_axes={"params": 0, "lora": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast) if cached else (nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.lora, name="layers")
            if cached:
                (x, cache), _ = layers((x, cache), positions, mask, jnp.arange(cfg.num_layers), cache_index)
            else:
                x, _ = layers(x, positions, mask)
        if last_only:
            x = x[:, -1:]
        x = RMSNorm(cfg, name="norm")(x)
        if final_hidden:
            return x
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = Linear(cfg.vocab_size, ("embed", "vocab"), cfg, out_dtype=jnp.float32, name="lm_head")(x)
        logits = constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
        return (logits, cache) if cached else logits


# ---------------------------------------------------------------------------------------------------- inputs
def default_positions(
    tokens: Array, attention_mask: Array | None = None, segment_ids: Array | None = None
) -> Array:
    """Positions: restart at 0 in each packed segment; count only real tokens under a padding mask."""
    b, t = tokens.shape
    if segment_ids is not None:
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        starts = jnp.concatenate(
            [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
        )
        start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
        return idx - start_idx
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def attention_mask_4d(attention_mask: Array | None, segment_ids: Array | None) -> Array | None:
    """Boolean [B, 1, T, T] mask from key padding and segment ids (causality is added by the kernel).

    `attention_mask[b, s] == 0` hides key s; tokens attend only within their own segment. With segment
    ids and no attention mask, segment id 0 marks padding.
    """
    if attention_mask is None and segment_ids is None:
        return None
    keep = None
    if attention_mask is not None:
        keep = attention_mask.astype(bool)[:, None, None, :]
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        if attention_mask is None:
            same = same & (segment_ids != 0)[:, None, None, :]
        keep = same if keep is None else keep & same
    return keep


# ------------------------------------------------------------------------------------------- functional API
@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(
    cfg: LlamaConfig,
    params: dict,
    tokens: Array,
    lora: AdapterLike | None = None,
    *,
    attention_mask: Array | None = None,
    segment_ids: Array | None = None,
    positions: Array | None = None,
    dropout_rng: Array | None = None,
) -> Array:
    """Logits float32 [B, T, V] for int32 tokens [B, T].

    lora: a `jaxcollab.lora.LoraAdapter` applied as an overlay (combine several with `lora.concatenate`).
    attention_mask: [B, T], 1 for real tokens and 0 for padding (left or right).
    segment_ids: [B, T], packed sequences; tokens attend only within their segment.
    positions: [B, T] RoPE positions; by default derived from the two masks (see `default_positions`).
    dropout_rng: a key turns on LoRA dropout (training); without one the pass is deterministic.
    """
    return _apply(cfg, params, tokens, lora, attention_mask, segment_ids, positions, dropout_rng)


def _apply(
    cfg: LlamaConfig, params: dict, tokens: Array, lora: AdapterLike | None, attention_mask: Array | None,
    segment_ids: Array | None, positions: Array | None, dropout_rng: Array | None, **apply_kwargs: Any,
) -> Any:
    """The model on `tokens` with the masks, positions, LoRA overlay and dropout that `forward` describes."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = default_positions(tokens, attention_mask, segment_ids)
    mask = attention_mask_4d(attention_mask, segment_ids)
    variables, runtime = _variables(params, lora, deterministic=dropout_rng is None)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return Llama(cfg, runtime).apply(variables, tokens, positions, mask, rngs=rngs, **apply_kwargs)


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_with_aux(
    cfg: LlamaConfig,
    params: dict,
    tokens: Array,
    lora: AdapterLike | None = None,
    *,
    attention_mask: Array | None = None,
    segment_ids: Array | None = None,
    positions: Array | None = None,
    dropout_rng: Array | None = None,
) -> tuple[Array, dict]:
    """`forward` plus what the layers sow, stacked over layers: `layer_inputs` [L, B, T, d] (the residual
    stream entering each layer) and, for a mixture of experts, `router_logits` [L, B, T, E]."""
    logits, state = _apply(cfg, params, tokens, lora, attention_mask, segment_ids, positions, dropout_rng,
                           mutable=["intermediates"])
    return logits, _sown(cfg, state)


def _sown(cfg: LlamaConfig, state: dict) -> dict:
    sown = state["intermediates"]["layers"]
    aux = {"layer_inputs": sown["layer_inputs"][0]}
    if cfg.is_moe:
        aux["router_logits"] = sown["mlp"]["router_logits"][0]
    return aux


@functools.partial(jax.jit, static_argnames=("cfg", "with_aux"))
def forward_hidden(
    cfg: LlamaConfig,
    params: dict,
    tokens: Array,
    lora: AdapterLike | None = None,
    *,
    attention_mask: Array | None = None,
    segment_ids: Array | None = None,
    positions: Array | None = None,
    dropout_rng: Array | None = None,
    with_aux: bool = False,
) -> Array | tuple[Array, dict]:
    """The final-normed hidden states [B, T, d] in the compute dtype: `forward` without the LM head, whose
    [d, V] kernel is `output_kernel(cfg, params)`. With `with_aux`, (hidden, aux) as `forward_with_aux`."""
    if not with_aux:
        return _apply(cfg, params, tokens, lora, attention_mask, segment_ids, positions, dropout_rng,
                      final_hidden=True)
    hidden, state = _apply(cfg, params, tokens, lora, attention_mask, segment_ids, positions, dropout_rng,
                           final_hidden=True, mutable=["intermediates"])
    return hidden, _sown(cfg, state)


def output_kernel(cfg: LlamaConfig, params: dict) -> Array:
    """The LM head as a [d, V] kernel in the compute dtype: `lm_head`, or the transposed embeddings when tied."""
    kernel = params["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    return kernel.astype(cfg.compute_dtype)


def matmul_precision(cfg: LlamaConfig) -> Any:
    """The `precision` argument of the model's matmuls (`cfg.precision` as a `jax.lax.Precision` or None)."""
    return _PRECISION[cfg.precision]


def _variables(params: dict, lora: AdapterLike | None, deterministic: bool) -> tuple[dict, LoraRuntime | None]:
    if lora is None:
        return {"params": params}, None
    runtime = LoraRuntime(float(lora.scaling), float(lora.dropout), deterministic=deterministic)
    return {"params": params, "lora": lora.weights}, runtime


def init_cache(cfg: LlamaConfig, batch: int, length: int) -> KVCache:
    """An empty KV cache for `batch` sequences of up to `length` tokens, in the compute dtype."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype)


def forward_with_cache(
    cfg: LlamaConfig,
    params: dict,
    tokens: Array,
    positions: Array,
    mask: Array,
    cache: KVCache,
    cache_index: Array,
    lora: AdapterLike | None = None,
    *,
    last_only: bool = False,
) -> tuple[Array, KVCache]:
    """One prefill or decode step: logits for `tokens` [B, T] and the cache with their keys/values.

    The tokens' keys/values are written at cache slots `cache_index .. cache_index + T - 1`; `mask`
    [B, 1, T, S] says which cache slots each query sees (causality and padding are the caller's).
    Meant to be called inside a jitted decoding loop. `params` (and the LoRA factors) may be stacked over
    layers or split by `unstack_layers`; split, the layers run unrolled on their own weight buffers.
    """
    variables, runtime = _variables(params, lora, deterministic=True)
    unrolled = "layers" not in params and "layers_0" in params
    return Llama(cfg, runtime, unrolled).apply(variables, tokens, positions, mask, cache, cache_index, last_only)


def unstack_layers(tree: dict, num_layers: int) -> dict:
    """`tree` (parameters or LoRA factors) with its `layers` subtree, stacked over layers, split into
    `layers_0 .. layers_{L-1}`: the layout `forward_with_cache` runs unrolled.

    Why: inside a scan (or a loop indexing the stack) XLA:CPU copies each layer's kernels out of the stacked
    arrays before every matmul; decoding one token reads every weight once, so that copy costs about as much
    as the matmuls themselves. Split once, the decode loop reads each kernel in place. The split is a copy:
    the layer weights are held twice while both trees live.
    """
    if "layers" not in tree:
        return tree
    split = {k: v for k, v in tree.items() if k != "layers"}
    for i in range(num_layers):
        split[f"layers_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], tree["layers"])
    return split


def _abstract_boxed(cfg: LlamaConfig) -> Any:
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    positions = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    init = lambda t, p: Llama(cfg).init(jax.random.key(0), t, p, None)  # noqa: E731
    return jax.eval_shape(init, tokens, positions)["params"]


@functools.lru_cache(maxsize=64)
def param_logical_axes(cfg: LlamaConfig) -> dict:
    """The parameter tree with a tuple of logical axis names at every leaf."""
    boxed = _abstract_boxed(cfg)
    return jax.tree.map(
        lambda p: tuple(p.names), boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def param_shapes(cfg: LlamaConfig) -> dict:
    """The parameter tree with a `jax.ShapeDtypeStruct` (storage dtype) at every leaf."""
    return nn.unbox(_abstract_boxed(cfg))


def param_shardings(cfg: LlamaConfig, mesh: jax.sharding.Mesh, rules: Rules = LOGICAL_RULES) -> dict:
    """The NamedSharding of every parameter on `mesh`, from its logical axes and `rules`."""
    return tree_shardings(param_logical_axes(cfg), param_shapes(cfg), mesh, rules)


def shard_params(cfg: LlamaConfig, params: dict, mesh: jax.sharding.Mesh, rules: Rules = LOGICAL_RULES) -> dict:
    """Move parameters onto `mesh` with the shardings `param_shardings` gives."""
    return jax.device_put(params, param_shardings(cfg, mesh, rules))


def init_params(cfg: LlamaConfig, key: Array) -> dict:
    """Random parameters (normal(0.02) weights, unit norms), as a plain nested dict."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(jax.jit(Llama(cfg).init)(key, tokens, tokens, None)["params"])

"""MoE mixing: one Mixtral-style model from a base and several models fine-tuned from it (moetify's design).

The embeddings, attention, norms and output head come from the base (or, with `shared="average"`, are
the mean over the expert models); the MLP of each fine-tuned model becomes one expert of every layer;
each layer gets a bias-free linear router [d, E]. The result is exactly a Mixtral layer stack, so it runs
with `model.forward` (cfg.num_experts > 0) and exports with `model.save_hf` as a Mixtral checkpoint.

Router modes:
- `gateless`: a zero router with top-k = E: every token averages all experts uniformly;
- `noisy`: router ~ N(0, noise_std) (0.02), softmax over experts, top-k, weights renormalised;
- `hidden`: router column e of layer l = the mean of the base model's residual stream entering layer l over
  the tokens of expert e's prompts, normalised to unit length (mergekit-moe's "hidden" gate idea, with the
  mean over real tokens).

Optionally the base's own MLP joins as expert 0 (`include_base`), and can be made always-on
(`always_on_base`: every token uses it besides its top-k choices; such a model has no Mixtral export).

Routers can then be trained alone: `train.router_mask` selects the router leaves, and the training loss
adds `load_balancing_loss` (Mixtral's, coefficient `TrainConfig.router_aux_coef`) and optionally
`router_z_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxcollab.model.config import LlamaConfig
from jaxcollab.model.llama import forward_with_aux, param_shardings

ROUTER_MODES = ("gateless", "noisy", "hidden")
SHARED_SOURCES = ("base", "average")
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class MixError(ValueError):
    """Models that cannot be mixed, or mixing options that do not fit together."""


def _check_same_shapes(base: dict, other: dict, label: str) -> None:
    base_leaves = jax.tree_util.tree_flatten_with_path(base)[0]
    other_leaves = dict(jax.tree_util.tree_flatten_with_path(other)[0])
    other_paths = {jax.tree_util.keystr(p) for p in other_leaves}
    base_paths = {jax.tree_util.keystr(p) for p, _ in base_leaves}
    if base_paths != other_paths:
        diff = sorted(base_paths ^ other_paths)
        raise MixError(f"{label} has a different parameter tree from the base (first difference: {diff[0]})")
    for path, leaf in base_leaves:
        if np.shape(other_leaves[path]) != np.shape(leaf):
            raise MixError(f"{label}: parameter {jax.tree_util.keystr(path)} has shape {np.shape(other_leaves[path])}"
                           f" but the base has {np.shape(leaf)}")


def hidden_router(
    cfg: LlamaConfig, base_params: dict, prompts_per_expert: Sequence[Sequence[Sequence[int]]], pad_id: int = 0
) -> jax.Array:
    """Router kernels [L, d, E] from the base's mean hidden states on each expert's prompts (unit columns)."""
    columns = []
    for expert, prompts in enumerate(prompts_per_expert):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise MixError(f"expert {expert}: the hidden router needs at least one non-empty prompt per expert")
        length = max(len(p) for p in prompts)
        tokens = np.full((len(prompts), length), pad_id, np.int32)
        mask = np.zeros((len(prompts), length), np.int32)
        for row, ids in enumerate(prompts):
            tokens[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        _, aux = forward_with_aux(cfg, base_params, tokens, attention_mask=mask)
        hidden = aux["layer_inputs"].astype(jnp.float32)  # [L, B, T, d]
        weights = jnp.asarray(mask, jnp.float32)[None, :, :, None]
        mean = jnp.sum(hidden * weights, axis=(1, 2)) / jnp.sum(weights, axis=(1, 2))  # [L, d]
        columns.append(mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-8))
    return jnp.stack(columns, axis=-1)


def mix(
    base_cfg: LlamaConfig,
    base_params: dict,
    experts: Sequence[dict],
    *,
    router: str = "noisy",
    top_k: int = 2,
    key: jax.Array | None = None,
    noise_std: float = 0.02,
    router_prompts: Sequence[Sequence[Sequence[int]]] | None = None,
    pad_id: int = 0,
    shared: str = "base",
    include_base: bool = False,
    always_on_base: bool = False,
) -> tuple[LlamaConfig, dict]:
    """(cfg, params) of the mixture: experts = [base MLP if include_base] + each model's MLP.

    router_prompts: for `router="hidden"`, token-id prompts per expert (in expert order, base first
    when included). Parameters land on the mesh the base parameters are on, if any.
    """
    if base_cfg.is_moe:
        raise MixError("the base is already a mixture of experts; mix dense Llama models")
    if not experts:
        raise MixError("mixing needs at least one expert model")
    if router not in ROUTER_MODES:
        raise MixError(f"unknown router mode {router!r}; choose one of {ROUTER_MODES}")
    if shared not in SHARED_SOURCES:
        raise MixError(f"shared={shared!r}; choose one of {SHARED_SOURCES}")
    if always_on_base and not include_base:
        raise MixError("always_on_base needs include_base=True (the base MLP must be an expert)")
    for i, params in enumerate(experts):
        _check_same_shapes(base_params, params, f"expert model {i}")
    sources = [base_params, *experts] if include_base else list(experts)
    num_experts = len(sources)
    k = num_experts if router == "gateless" else top_k
    if not 1 <= k <= num_experts:
        raise MixError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts})")
    if always_on_base and k < 2:
        raise MixError("an always-on base expert needs top_k >= 2 (the base plus at least one routed expert)")

    cfg = base_cfg.replace(num_experts=num_experts, num_experts_per_tok=k,
                           always_on_expert=0 if always_on_base else None)
    if shared == "base":
        params = {name: value for name, value in base_params.items() if name != "layers"}
        layers = {name: value for name, value in base_params["layers"].items() if name != "mlp"}
    else:
        averaged = jax.tree.map(
            lambda *xs: (sum(x.astype(jnp.float32) for x in xs) / len(xs)).astype(xs[0].dtype), *experts)
        params = {name: value for name, value in averaged.items() if name != "layers"}
        layers = {name: value for name, value in averaged["layers"].items() if name != "mlp"}
    mlp: dict[str, Any] = {
        proj: {"kernel": jnp.stack([s["layers"]["mlp"][proj]["kernel"] for s in sources], axis=1)}
        for proj in _MLP_PROJECTIONS
    }
    dtype = base_cfg.storage_dtype
    router_shape = (base_cfg.num_layers, base_cfg.hidden_size, num_experts)
    if router == "gateless":
        kernel = jnp.zeros(router_shape, dtype)
    elif router == "noisy":
        if key is None:
            raise MixError("the noisy router needs a random key")
        kernel = (noise_std * jax.random.normal(key, router_shape, jnp.float32)).astype(dtype)
    else:
        if router_prompts is None or len(router_prompts) != num_experts:
            given = 0 if router_prompts is None else len(router_prompts)
            raise MixError(f"the hidden router needs prompts for each of the {num_experts} experts; got {given}")
        kernel = hidden_router(base_cfg, base_params, router_prompts, pad_id).astype(dtype)
    mlp["router"] = {"kernel": kernel}
    params["layers"] = {**layers, "mlp": mlp}
    return cfg, _place_like(cfg, params, base_params)


def _place_like(cfg: LlamaConfig, params: dict, reference: dict) -> dict:
    for leaf in jax.tree.leaves(reference):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return jax.device_put(params, param_shardings(cfg, sharding.mesh))
    return params


# --------------------------------------------------------------------------------------------------- losses
def load_balancing_loss(router_logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """Mixtral's auxiliary loss: E * sum_e f_e * P_e over all layers' tokens.

    router_logits [..., T, E] (e.g. [L, B, T, E]); f_e = share of top-k assignments that go to expert e
    (counted over the k choices of each token), P_e = mean routing probability of e; `mask` [B, T]
    (1 = real token) restricts both means to real tokens, as transformers' `load_balancing_loss_func`.
    """
    num_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    counts = jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32), axis=-2)  # [..., T, E]
    weights = jnp.ones(probs.shape[:-1], jnp.float32) if mask is None else jnp.broadcast_to(
        jnp.asarray(mask, jnp.float32), probs.shape[:-1])
    total = jnp.maximum(jnp.sum(weights), 1.0)
    tokens_per_expert = jnp.sum(counts * weights[..., None], axis=tuple(range(counts.ndim - 1))) / total
    prob_per_expert = jnp.sum(probs * weights[..., None], axis=tuple(range(probs.ndim - 1))) / total
    return num_experts * jnp.sum(tokens_per_expert * prob_per_expert)


def router_z_loss(router_logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over real tokens of logsumexp(router logits)^2 (ST-MoE's router z-loss)."""
    z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1) ** 2
    if mask is None:
        return jnp.mean(z)
    weights = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), z.shape)
    return jnp.sum(z * weights) / jnp.maximum(jnp.sum(weights), 1.0)

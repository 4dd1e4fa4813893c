"""LoRA and o-LoRA as functional overlays on the Llama parameter tree, with PEFT-compatible files.

An adapter is its own pytree, `LoraAdapter(weights, scaling, dropout)`. `weights` mirrors the parameter
tree for the targeted linear modules, stacked over layers like the scanned model:

    {"layers": {"self_attn": {"q_proj": {"lora_A": [L, r, d_in], "lora_B": [L, d_out, r]}, ...},
                "mlp": {"down_proj": {...}, ...}}}

A and B are stored in PEFT's orientation (A: r x d_in, B: d_out x r), so files map one to one.
`scaling` (alpha/r, or alpha/sqrt(r) with rsLoRA) and `dropout` are static (pytree metadata): gradients
and optimizers see only the factors. `model.forward(cfg, params, tokens, lora=adapter)` computes
`x W + scaling * dropout(x) A^T B^T` without forming `W + BA`; `fold` folds an adapter into the weights.

o-LoRA (the paper's variant of O-LoRA): each round trains a new adapter with the penalty
`lambda * sum_targets sum_jk |A_new A_prev^T|_jk`, where `A_prev` stacks the A matrices of all earlier
rounds ("the A bank"). In `merged` mode earlier adapters are merged into the weights and only their A
is kept; in `frozen` mode (original O-LoRA) they stay as frozen overlays (`concatenate`) and the loss also
gets `lambda2 * sum ||new factor||_2`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jaxcollab.atomic import atomic_directory, atomic_file
from jaxcollab.model.config import LlamaConfig, dtype_name
from jaxcollab.model.safetensors_io import CheckpointError, SafetensorsFile, TensorToWrite, write_safetensors
from jaxcollab.model.sharding import LOGICAL_RULES, logical_to_spec
from jaxcollab.trees import find_path, set_path

# Module kind -> path of its kernel in the parameter tree (and of its factors in the adapter).
TARGET_PATHS: dict[str, tuple[str, ...]] = {
    "q_proj": ("layers", "self_attn", "q_proj"),
    "k_proj": ("layers", "self_attn", "k_proj"),
    "v_proj": ("layers", "self_attn", "v_proj"),
    "o_proj": ("layers", "self_attn", "o_proj"),
    "gate_proj": ("layers", "mlp", "gate_proj"),
    "up_proj": ("layers", "mlp", "up_proj"),
    "down_proj": ("layers", "mlp", "down_proj"),
}
ALL_TARGETS = tuple(TARGET_PATHS)
_UNSUPPORTED_TARGETS = ("lm_head", "embed_tokens")
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
A_BANK_FILE = "olora_a_bank.safetensors"
_PEFT_PREFIX = "base_model.model."


class LoraError(ValueError):
    """A LoRA configuration or adapter file that cannot be used with this model."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyperparameters (PEFT's names in brackets).

    target_modules: a list of module names (a module matches if its full name equals one or ends with
    ".name") or one regex string matched against full names such as `model.layers.3.self_attn.q_proj`
    (PEFT's rule). Must select whole module kinds (every layer or none).
    """

    rank: int = 8  # [r]
    alpha: float = 16.0  # [lora_alpha]
    dropout: float = 0.0  # [lora_dropout]
    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    init: str = "kaiming"  # PEFT's default (A kaiming-uniform, B zeros), or "gaussian" (A ~ N(0, 1/r))
    dtype: str = "float32"  # storage dtype of the factors

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise LoraError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise LoraError(f"lora alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("kaiming", "gaussian"):
            raise LoraError(f"init={self.init!r}; choose 'kaiming' (PEFT's default) or 'gaussian'")
        if not self.target_modules:
            raise LoraError("target_modules is empty; name at least one module, e.g. ('q_proj', 'v_proj')")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@flax.struct.dataclass
class LoraAdapter:
    """LoRA factors (a pytree of arrays) plus the static scaling and dropout they are applied with."""

    weights: dict
    scaling: float = flax.struct.field(pytree_node=False)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t, path in TARGET_PATHS.items() if find_path(self.weights, path) is not None)

    @property
    def rank(self) -> int:
        first = find_path(self.weights, TARGET_PATHS[self.targets[0]])
        return int(first["lora_A"].shape[1])

    def factors(self, target: str) -> tuple[jax.Array, jax.Array]:
        node = find_path(self.weights, TARGET_PATHS[target])
        return node["lora_A"], node["lora_B"]


def _module_name(target: str, layer: int) -> str:
    return f"model.layers.{layer}.{'.'.join(TARGET_PATHS[target][1:])}"


def resolve_targets(lora_cfg: LoraConfig, model_cfg: LlamaConfig) -> tuple[str, ...]:
    """The module kinds (q_proj, ..., down_proj) that `target_modules` selects, in canonical order."""
    spec = lora_cfg.target_modules
    if isinstance(spec, str):
        pattern = re.compile(spec)
        matches = lambda name: pattern.fullmatch(name) is not None  # noqa: E731
    else:
        matches = lambda name: any(name == t or name.endswith("." + t) for t in spec)  # noqa: E731
    selected = []
    for target in ALL_TARGETS:
        hits = [matches(_module_name(target, layer)) for layer in range(model_cfg.num_layers)]
        if all(hits):
            selected.append(target)
        elif any(hits):
            layers = [i for i, hit in enumerate(hits) if hit]
            raise LoraError(
                f"target_modules={spec!r} selects {target} only in layers {layers}; jaxcollab's scanned model"
                " takes LoRA on every layer of a module kind or none"
            )
    if not isinstance(spec, str):
        unsupported = [t for t in spec if t in _UNSUPPORTED_TARGETS]
        if unsupported:
            raise LoraError(f"LoRA on {unsupported} is not supported; targets are {ALL_TARGETS}")
    if not selected:
        raise LoraError(
            f"target_modules={spec!r} matches no module of this Llama; module names look like"
            f" 'model.layers.0.self_attn.q_proj'; the kinds are {ALL_TARGETS}"
        )
    return tuple(selected)


def _factor_shapes(model_cfg: LlamaConfig, target: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    d, f, hd = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.head_dim
    d_in, d_out = {
        "q_proj": (d, model_cfg.num_heads * hd),
        "k_proj": (d, model_cfg.num_kv_heads * hd),
        "v_proj": (d, model_cfg.num_kv_heads * hd),
        "o_proj": (model_cfg.num_heads * hd, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }[target]
    return (model_cfg.num_layers, rank, d_in), (model_cfg.num_layers, d_out, rank)


_KERNEL_AXES = {
    "q_proj": ("embed", "q_heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
    "o_proj": ("q_heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


def logical_axes(adapter: LoraAdapter) -> dict:
    """Logical axis names of each factor (rank replicated, the other axes as the target's kernel)."""
    out: dict = {}
    for target in adapter.targets:
        d_in, d_out = _KERNEL_AXES[target]
        set_path(out, TARGET_PATHS[target], {"lora_A": ("layers", "lora_rank", d_in),
                                         "lora_B": ("layers", d_out, "lora_rank")})
    return out


_RULES_WITH_RANK = (*LOGICAL_RULES, ("lora_rank", None))


def _mesh_of(params: dict) -> Any:
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def shard_like_params(adapter: LoraAdapter, params: dict) -> LoraAdapter:
    """Place the factors on the mesh the parameters live on (by the logical rules); no-op unsharded."""
    mesh = _mesh_of(params)
    if mesh is None:
        return adapter

    def place(names: tuple[str, ...], x: jax.Array) -> jax.Array:
        return jax.device_put(x, NamedSharding(mesh, logical_to_spec(names, _RULES_WITH_RANK, x.shape, mesh)))

    weights = jax.tree.map(place, logical_axes(adapter), adapter.weights, is_leaf=lambda x: isinstance(x, tuple))
    return adapter.replace(weights=weights)


def init(lora_cfg: LoraConfig, model_cfg: LlamaConfig, params: dict | None, key: jax.Array) -> LoraAdapter:
    """A fresh adapter: A random (PEFT's kaiming-uniform or gaussian), B zero, so it starts as a no-op.

    `params` only decides placement: the adapter goes onto the mesh the parameters are sharded over.
    """
    targets = resolve_targets(lora_cfg, model_cfg)
    dtype = jnp.dtype(lora_cfg.dtype)
    weights: dict = {}
    for target, target_key in zip(targets, jax.random.split(key, len(targets)), strict=True):
        a_shape, b_shape = _factor_shapes(model_cfg, target, lora_cfg.rank)
        if lora_cfg.init == "kaiming":
            # torch's kaiming_uniform_(a=sqrt(5)) on an [r, d_in] weight: bound = 1/sqrt(d_in).
            bound = 1.0 / math.sqrt(a_shape[-1])
            a = jax.random.uniform(target_key, a_shape, jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(target_key, a_shape, jnp.float32) / lora_cfg.rank
        set_path(weights, TARGET_PATHS[target], {"lora_A": a.astype(dtype), "lora_B": jnp.zeros(b_shape, dtype)})
    adapter = LoraAdapter(weights, lora_cfg.scaling, lora_cfg.dropout)
    return shard_like_params(adapter, params) if params is not None else adapter


def delta(adapter: LoraAdapter, target: str) -> jax.Array:
    """The kernel-layout weight update of one target, [L, d_in, d_out] = scaling * (B A)^T, in fp32."""
    a, b = adapter.factors(target)
    return adapter.scaling * jnp.einsum("lri,lor->lio", a.astype(jnp.float32), b.astype(jnp.float32),
                                        precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _fold_jit(params: dict, adapter: LoraAdapter) -> dict:
    merged = jax.tree.map(lambda x: x, params)
    for target in adapter.targets:
        path = (*TARGET_PATHS[target], "kernel")
        kernel = find_path(params, path)
        set_path(merged, path, (kernel.astype(jnp.float32) + delta(adapter, target)).astype(kernel.dtype))
    return merged


def fold(params: dict, adapter: LoraAdapter, lora_cfg: LoraConfig | None = None) -> dict:
    """New params with the adapter folded in (`W + scaling * BA`), computed in fp32 and cast back.

    Shardings of the parameters are kept. `lora_cfg`, when given, must agree with the adapter's scaling.
    """
    if lora_cfg is not None and not math.isclose(lora_cfg.scaling, adapter.scaling, rel_tol=1e-9):
        raise LoraError(f"adapter scaling {adapter.scaling} differs from the config's {lora_cfg.scaling}")
    merged = _fold_jit(params, adapter)
    return jax.tree.map(
        lambda new, old: jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new, merged, params
    )


def concatenate(adapters: Sequence[LoraAdapter]) -> LoraAdapter:
    """One adapter equivalent to applying several side by side (ranks concatenated).

    Each adapter's scaling is folded into its B, so adapters with different scalings combine exactly
    (without dropout: one dropout mask is shared by the concatenated factors).
    """
    if not adapters:
        raise LoraError("concatenate needs at least one adapter")
    if len(adapters) == 1:
        return adapters[0]
    targets = sorted({t for a in adapters for t in a.targets}, key=ALL_TARGETS.index)
    weights: dict = {}
    for target in targets:
        a_parts, b_parts = [], []
        for adapter in adapters:
            if target in adapter.targets:
                a, b = adapter.factors(target)
                a_parts.append(a)
                b_parts.append(b * jnp.asarray(adapter.scaling, b.dtype))
        set_path(weights, TARGET_PATHS[target], {"lora_A": jnp.concatenate(a_parts, axis=1),
                                             "lora_B": jnp.concatenate(b_parts, axis=2)})
    return LoraAdapter(weights, 1.0, max(a.dropout for a in adapters))


# ------------------------------------------------------------------------------------------------- o-LoRA
def orthogonality_penalty(adapter: LoraAdapter, previous_a: dict | None) -> jax.Array:
    """sum over targets (and layers) of sum_jk |A_new A_prev^T|_jk; 0 without a bank (round 1).

    `previous_a` is an A bank: {target path: {"lora_A": [L, R_prev, d_in]}} as built by `extend_a_bank`.
    """
    total = jnp.zeros((), jnp.float32)
    if previous_a is None:
        return total
    for target in adapter.targets:
        prev = find_path(previous_a, TARGET_PATHS[target])
        if prev is None:
            continue
        a_new = adapter.factors(target)[0].astype(jnp.float32)
        overlap = jnp.einsum("lri,lpi->lrp", a_new, prev["lora_A"].astype(jnp.float32))
        total = total + jnp.sum(jnp.abs(overlap))
    return total


def l2_penalty(adapter: LoraAdapter) -> jax.Array:
    """sum over targets, layers and both factors of the Frobenius norm (O-LoRA's lambda2 term).

    Uses a norm whose gradient is defined at zero (B starts at zero).
    """
    norms = [
        optax.safe_norm(x.astype(jnp.float32), 0.0, axis=(1, 2)).sum() for x in jax.tree.leaves(adapter.weights)
    ]
    return jnp.sum(jnp.stack(norms))


A_BANK = "a_bank"  # where an o-LoRA training's variables hold the A bank of the earlier rounds


def _orthogonality_term(variables: dict) -> jax.Array:
    adapter = variables.get("lora")
    if adapter is None:
        return jnp.zeros((), jnp.float32)
    return orthogonality_penalty(adapter, variables.get(A_BANK))


def _l2_term(variables: dict) -> jax.Array:
    adapter = variables.get("lora")
    return jnp.zeros((), jnp.float32) if adapter is None else l2_penalty(adapter)


def olora_penalties(lam: float, lam2: float = 0.0) -> tuple[tuple[float, Callable[[dict], jax.Array]], ...]:
    """o-LoRA's loss terms, for `train.TrainConfig(penalties=...)`: lam times the orthogonality of the
    trained adapter (variables["lora"]) to the earlier rounds' A matrices (variables[A_BANK]), and lam2 times
    the L2 norm of its factors (original O-LoRA). Terms of weight 0 are left out."""
    return tuple((weight, term) for weight, term in ((lam, _orthogonality_term), (lam2, _l2_term)) if weight)


def extend_a_bank(bank: dict | None, adapter: LoraAdapter) -> dict:
    """The A bank with this adapter's A matrices appended along the rank axis."""
    out: dict = jax.tree.map(lambda x: x, bank) if bank else {}
    for target in adapter.targets:
        a = adapter.factors(target)[0]
        prev = find_path(out, TARGET_PATHS[target])
        set_path(out, TARGET_PATHS[target],
             {"lora_A": a if prev is None else jnp.concatenate([prev["lora_A"], a.astype(prev["lora_A"].dtype)], 1)})
    return out


def save_a_bank(bank: dict, path: str | os.PathLike) -> Path:
    """Write the A bank as safetensors (`<target path>.lora_A` -> [L, R_total, d_in]), atomically."""
    path = Path(path)
    tensors = []
    for tpath in TARGET_PATHS.values():
        node = find_path(bank, tpath)
        if node is not None:
            value = node["lora_A"]
            tensors.append(TensorToWrite(".".join(tpath) + ".lora_A", tuple(value.shape),
                                         np.dtype(value.dtype), lambda v=value: np.asarray(jax.device_get(v))))
    with atomic_file(path) as tmp:
        write_safetensors(tmp, tensors, {"format": "jaxcollab-olora-a-bank"})
    return path


def load_a_bank(path: str | os.PathLike) -> dict:
    file = SafetensorsFile(path)
    by_name = {".".join(p) + ".lora_A": p for p in TARGET_PATHS.values()}
    bank: dict = {}
    for name in file.names():
        if name not in by_name:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} in an o-LoRA A bank")
        set_path(bank, by_name[name], {"lora_A": jnp.asarray(file.read(name))})
    return bank


# -------------------------------------------------------------------------------------------- PEFT files
def _peft_name(target: str, layer: int, factor: str) -> str:
    return f"{_PEFT_PREFIX}{_module_name(target, layer)}.{factor}.weight"


def save_peft(
    adapter: LoraAdapter, lora_cfg: LoraConfig, out_dir: str | os.PathLike, *,
    base_model_name_or_path: str | None = None, overwrite: bool = False,
) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` that `peft.PeftModel.from_pretrained` loads."""
    out_dir = Path(out_dir)
    if not math.isclose(lora_cfg.scaling, adapter.scaling, rel_tol=1e-9):
        raise LoraError(f"adapter scaling {adapter.scaling} differs from the config's {lora_cfg.scaling}")
    tensors = []
    for target in adapter.targets:
        a, b = adapter.factors(target)
        for layer in range(a.shape[0]):
            for factor, value in (("lora_A", a), ("lora_B", b)):
                tensors.append(TensorToWrite(
                    _peft_name(target, layer, factor), tuple(value.shape[1:]), np.dtype(value.dtype),
                    lambda v=value, i=layer: np.asarray(jax.device_get(v[i])),
                ))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora_cfg.rank,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": list(adapter.targets),
        "use_rslora": lora_cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True if lora_cfg.init == "kaiming" else "gaussian",
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "layers_to_transform": None,
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(tmp / ADAPTER_FILE, tensors, {"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def load_peft(
    path: str | os.PathLike, model_cfg: LlamaConfig, *, dtype: Any = jnp.float32, params: dict | None = None
) -> tuple[LoraAdapter, LoraConfig]:
    """Read a PEFT LoRA adapter directory for this model; `params` (optional) decides mesh placement."""
    path = Path(path)
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a PEFT adapter directory needs {ADAPTER_CONFIG}")
    try:
        pc = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise LoraError(f"{config_path}: not valid JSON ({e})") from None
    if pc.get("peft_type") != "LORA":
        raise LoraError(f"{config_path}: peft_type={pc.get('peft_type')!r}; only LORA adapters are supported")
    for key, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if pc.get(key, ok) != ok:
            raise LoraError(f"{config_path}: {key}={pc[key]!r} is not supported (expected {ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if pc.get(key):
            raise LoraError(f"{config_path}: {key}={pc[key]!r} is not supported")
    targets = pc.get("target_modules")
    lora_cfg = LoraConfig(
        rank=int(pc["r"]), alpha=float(pc["lora_alpha"]), dropout=float(pc.get("lora_dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else tuple(targets or ()),
        use_rslora=bool(pc.get("use_rslora", False)), dtype=dtype_name(dtype),
        init="gaussian" if pc.get("init_lora_weights") == "gaussian" else "kaiming",
    )
    file_path = path / ADAPTER_FILE
    if not file_path.is_file():
        raise FileNotFoundError(f"{file_path} not found (pickle adapter_model.bin files are never loaded)")
    file = SafetensorsFile(file_path)
    expected: dict[str, tuple[str, int, str]] = {}
    try:
        targets_found = resolve_targets(lora_cfg, model_cfg)
    except LoraError as e:
        raise LoraError(f"{config_path}: {e}") from None
    for target in targets_found:
        for layer in range(model_cfg.num_layers):
            for factor in ("lora_A", "lora_B"):
                expected[_peft_name(target, layer, factor)] = (target, layer, factor)
    names = set(file.names())
    missing = sorted(set(expected) - names)
    unknown = sorted(names - set(expected))
    if missing or unknown:
        raise LoraError(
            f"{file_path} does not fit this model ({model_cfg.num_layers} layers, targets {list(targets_found)}):"
            f" missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected"
            f" {unknown[:4]}{' ...' if len(unknown) > 4 else ''}; was it trained for another architecture?"
        )
    np_dtype = np.dtype(jnp.dtype(dtype))
    weights: dict = {}
    for target in targets_found:
        a_shape, b_shape = _factor_shapes(model_cfg, target, lora_cfg.rank)
        stacked = {}
        for factor, shape in (("lora_A", a_shape), ("lora_B", b_shape)):
            layers = []
            for layer in range(model_cfg.num_layers):
                name = _peft_name(target, layer, factor)
                value = file.read(name)
                if tuple(value.shape) != shape[1:]:
                    raise LoraError(
                        f"{file_path}: tensor {name!r} has shape {list(value.shape)} but this model with r="
                        f"{lora_cfg.rank} needs {list(shape[1:])}; was it trained for another architecture?"
                    )
                layers.append(np.asarray(value, dtype=np_dtype))
            stacked[factor] = jnp.asarray(np.stack(layers))
        set_path(weights, TARGET_PATHS[target], stacked)
    adapter = LoraAdapter(weights, lora_cfg.scaling, lora_cfg.dropout)
    if params is not None:
        adapter = shard_like_params(adapter, params)
    return adapter, lora_cfg

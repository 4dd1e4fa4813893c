"""Llama 3 architecture and run-time settings, and their translation from and to Hugging Face config.json.

`LlamaConfig` is a frozen (hashable) dataclass so it can be a static argument of `jax.jit`. It holds the
architecture (what config.json says) plus three run-time settings that never change the weights:
`dtype` (compute), `param_dtype` (storage) and `remat_policy`. With `num_experts > 0` the MLP of every
layer is a Mixtral-style mixture of experts (a router plus `num_experts` SwiGLU experts, top
`num_experts_per_tok` per token); config.json then says `model_type: mixtral`. Both transformers 4.x config files
(`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x files (`rope_parameters` with `rope_theta` inside,
`dtype`) are read; `to_hf_dict` writes both spellings so either version loads the result.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mixtral")
MOE_IMPLS = ("sparse", "dense")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_proj")
PRECISIONS = ("default", "high", "highest")


class ConfigError(ValueError):
    """A config.json (or a config object) that jaxcollab cannot turn into a Llama model."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (`rope_type: "llama3"`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama 3 decoder plus compute settings (dtype, storage dtype, remat)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Mixture of experts (0 experts: a dense Llama MLP).
    num_experts: int = 0
    num_experts_per_tok: int = 2
    always_on_expert: int | None = None  # an expert every token uses besides its top-k choices (not Mixtral)
    # Run-time settings (not part of the checkpoint).
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    precision: str = "default"
    attention_impl: str | None = None  # None (let JAX pick), "xla" or "cudnn"
    moe_impl: str = "sparse"  # "sparse": only the chosen experts run (ragged matmuls); "dense": all (reference)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_heads};"
                    " set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} must be a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("dtype", "param_dtype"):
            _check_dtype_name(getattr(self, name), name)
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}; choose one of {PRECISIONS}")
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ConfigError(f"attention_impl={self.attention_impl!r}; choose None, 'xla' or 'cudnn'")
        if self.moe_impl not in MOE_IMPLS:
            raise ConfigError(f"moe_impl={self.moe_impl!r}; choose one of {MOE_IMPLS}")
        if self.num_experts < 0:
            raise ConfigError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and num_experts={self.num_experts}"
            )
        if self.always_on_expert is not None and not 0 <= self.always_on_expert < max(self.num_experts, 1):
            raise ConfigError(f"always_on_expert={self.always_on_expert} is not an expert index")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some fields changed (dtype names may be given as numpy/jax dtypes)."""
        for name in ("dtype", "param_dtype"):
            if name in changes:
                changes[name] = dtype_name(changes[name])
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * d * f * max(self.num_experts, 1) + d * self.num_experts
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json", **runtime: Any) -> LlamaConfig:
        """Build from a config.json dict (transformers 4.x or 5.x spelling). `runtime` sets dtype etc."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; jaxcollab loads {SUPPORTED_MODEL_TYPES}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ConfigError(f"{source}: required keys missing: {missing}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r}; Llama uses 'silu' and no other is supported")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"{source}: {flag}=true is not supported (Llama 3 has no biases)")
        theta, scaling = _read_rope(hf, source)
        num_heads = int(hf["num_attention_heads"])
        moe = {}
        if model_type == "mixtral":
            moe = dict(num_experts=int(hf.get("num_local_experts", 8)),
                       num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)))
            if hf.get("sliding_window"):
                raise ConfigError(f"{source}: sliding_window={hf['sliding_window']} is not supported")
        kwargs = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            **moe,
        )
        kwargs.update({k: dtype_name(v) if k in ("dtype", "param_dtype") else v for k, v in runtime.items()})
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained_dir(cls, path: str | Path, **runtime: Any) -> LlamaConfig:
        """Read `path/config.json`."""
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} not found: a Hugging Face model directory needs config.json next to its weights"
            )
        try:
            hf = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(hf, source=str(config_path), **runtime)

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """config.json contents that transformers 4.x and 5.x both read as this model."""
        rope_parameters: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
            rope_parameters.update(rope_scaling)
        dtype = torch_dtype or self.param_dtype
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        if self.always_on_expert is not None:
            raise ConfigError("an always-on expert has no Hugging Face (Mixtral) equivalent; it cannot be exported")
        moe: dict[str, Any] = {}
        if self.is_moe:
            moe = {"num_local_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                   "sliding_window": None, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.0,
                   "output_router_logits": False}
        return {
            "architectures": ["MixtralForCausalLM" if self.is_moe else "LlamaForCausalLM"],
            "model_type": "mixtral" if self.is_moe else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "rope_parameters": rope_parameters,  # transformers >= 5
            "rope_theta": self.rope_theta,  # transformers 4.x
            "rope_scaling": rope_scaling,  # transformers 4.x
            "dtype": dtype,  # transformers >= 5
            "torch_dtype": dtype,  # transformers 4.x
            "use_cache": True,
            **moe,
        }


def _read_rope(hf: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """RoPE base and llama3 scaling from either config.json spelling."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping) or not isinstance(legacy, Mapping):
        raise ConfigError(f"{source}: rope_parameters / rope_scaling must be JSON objects")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    spec = params if params.get("rope_type", params.get("type")) not in (None, "default") else legacy
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(
            f"{source}: rope_type={rope_type!r} is not supported; jaxcollab implements 'default' and 'llama3'"
        )
    try:
        scaling = RopeScaling(
            factor=float(spec["factor"]),
            low_freq_factor=float(spec["low_freq_factor"]),
            high_freq_factor=float(spec["high_freq_factor"]),
            original_max_position_embeddings=int(spec["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"{source}: llama3 rope scaling is missing {e.args[0]!r}") from None
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ConfigError(f"{source}: llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return float(theta), scaling


def dtype_name(dtype: Any) -> str:
    """'bfloat16' for jnp.bfloat16, np.dtype('bfloat16'), 'bf16', 'bfloat16', ..."""
    aliases = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16"}
    if isinstance(dtype, str):
        dtype = aliases.get(dtype, dtype)
    return np.dtype(jnp.dtype(dtype)).name


def _check_dtype_name(name: str, field: str) -> None:
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{field}={name!r}; choose float32, bfloat16 or float16")

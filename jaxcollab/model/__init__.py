"""The Llama 3 model: config, Flax forward pass, Hugging Face import/export and sharding.

    cfg, params = model.load_hf(path, dtype=jnp.float32, mesh=None)
    logits = model.forward(cfg, params, tokens)          # int32 [B, T] -> float32 [B, T, V]
    model.save_hf(cfg, params, out_dir)
"""

from jaxcollab.model.config import ConfigError, LlamaConfig, RopeScaling
from jaxcollab.model.gguf import load_gguf
from jaxcollab.model.hf import load_hf, save_hf
from jaxcollab.model.llama import (
    forward,
    init_params,
    param_logical_axes,
    param_shapes,
    param_shardings,
    shard_params,
)
from jaxcollab.model.safetensors_io import CheckpointError
from jaxcollab.model.sharding import MeshConfig, make_mesh, maybe_initialize_distributed

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LlamaConfig",
    "MeshConfig",
    "RopeScaling",
    "forward",
    "init_params",
    "load_gguf",
    "load_hf",
    "make_mesh",
    "maybe_initialize_distributed",
    "param_logical_axes",
    "param_shapes",
    "param_shardings",
    "save_hf",
    "shard_params",
]

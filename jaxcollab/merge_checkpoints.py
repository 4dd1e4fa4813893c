"""Merging Hugging Face model directories file to file, one tensor at a time (what `jaxcollab.merge --models`
runs).

Each tensor of the output is read from the base and every model (positioned reads of just that tensor),
merged on the default device by `jaxcollab.merging.merge_leaves` with the method's recipe, and written into
the output shards before the next tensor is read. Host and device memory therefore stay at about
n + 2 copies of the largest tensor whatever the model size, and no tensor is transposed or re-laid out:
the task-vector merges are elementwise apart from the top-k of each tensor, which does not depend on the
layout. Every Hugging Face tensor is its own unit, as in mergekit: a layer (and, for a mixture of
experts, an expert) at a time. The result equals `merging.merge` on the loaded parameter trees, apart
from DARE's random masks, which are keyed by the Hugging Face tensor names here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxcollab import merging
from jaxcollab.model.config import LlamaConfig, dtype_name
from jaxcollab.model.hf import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointDir,
    hf_tensor_shapes,
    open_checkpoint,
    write_hf_directory,
)
from jaxcollab.model.safetensors_io import TensorToWrite

# LlamaConfig fields that may differ between the inputs without changing what the tensors mean.
_RUNTIME_FIELDS = {"dtype", "param_dtype", "remat_policy", "precision", "attention_impl", "moe_impl"}


def config_differences(a: LlamaConfig, b: LlamaConfig) -> list[str]:
    """The architecture fields (not run-time settings) in which two configs differ."""
    return [name for name in a.__dataclass_fields__ if name not in _RUNTIME_FIELDS
            and getattr(a, name) != getattr(b, name)]


def merge_checkpoints(
    method: str,
    base: str | os.PathLike | None,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    seed: int = 0,
    scale: float = 1.0,
    normalize: bool | None = None,
    majority_sign_method: str = "total",
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge the HF Llama directories `models` onto `base` by their task vectors and write HF directory `out`.

    The options are those of `jaxcollab.merging.merge`. Inputs are read and the output written in `dtype`
    (merging accumulates in float32 or wider). The base's config is kept (models[0]'s for an `average`
    without a base); a model whose config implies other tensors or shapes is an error, other config
    differences a warning.
    `out` appears complete or not at all.
    """
    recipe = merging.full_model_recipe(method, density, scale=scale, normalize=normalize,
                                       majority_sign_method=majority_sign_method)
    if not models:
        raise merging.MergeError("merge needs at least one model")
    weight_list = merging.check_weights(weights, len(models), "models")
    reference_dir = Path(base if base is not None else models[0])
    if method == "average":
        if scale != 1.0:
            raise merging.MergeError("scale applies to task vectors; 'average' takes none (use task_arithmetic)")
        if abs(sum(weight_list)) < 1e-8:
            raise merging.MergeError(f"the weights of an average must not sum to zero, got {weight_list}")
        base = None  # an average takes no task vectors; a given base only supplies the config
    elif base is None:
        raise merging.MergeError(f"'{method}' merges task vectors (model - base) and needs the base model")
    cfg = LlamaConfig.from_pretrained_dir(reference_dir)
    shapes = hf_tensor_shapes(cfg)
    for i, path in enumerate(models):
        model_cfg = LlamaConfig.from_pretrained_dir(path)
        model_shapes = hf_tensor_shapes(model_cfg)
        for name, shape in shapes.items():
            if model_shapes.get(name) != shape:
                got = f"has shape {model_shapes[name]}" if name in model_shapes else "is missing"
                raise merging.MergeError(
                    f"tensor {name!r} {got} in models[{i}] ({path}) but has shape {shape} in {reference_dir}; "
                    "models must have the same architecture")
        different = config_differences(cfg, model_cfg)
        if different:
            print(f"warning: {path}/config.json differs from {reference_dir} in {different}; "
                  f"{reference_dir.name}'s is kept", file=sys.stderr)
    base_ckpt = open_checkpoint(base, cfg) if base is not None else None
    model_ckpts = [open_checkpoint(path, cfg) for path in models]
    np_dtype = np.dtype(jnp.dtype(dtype))
    key = merging.as_key(seed)
    bar = tqdm(total=len(shapes), desc=f"merge ({method})", unit="tensor", disable=not progress, leave=False)

    def read(ckpt: CheckpointDir, name: str) -> jax.Array:
        # flat: the merge is elementwise but for the top-k over the whole tensor, so tensors of one size
        # (q and o, k and v, the three MLP projections, embeddings and head) share one compiled merge
        return jnp.asarray(ckpt.read(name, ()).reshape(-1), dtype=np_dtype)

    def merged_tensor(name: str) -> np.ndarray:
        shape = shapes[name]
        merged = merging.merge_leaves(
            recipe, read(base_ckpt, name) if base_ckpt is not None else None,
            [read(ckpt, name) for ckpt in model_ckpts], weight_list, merging.leaf_key(key, name),
            rows=merging.Rows(shape[-1] if shape else 1))  # HF tensors: rows along the last axis
        bar.update(1)
        return np.asarray(merged).reshape(shapes[name])

    tensors = [TensorToWrite(name, shape, np_dtype, lambda name=name: merged_tensor(name))
               for name, shape in shapes.items()]
    try:
        write_hf_directory(Path(out), tensors, cfg.to_hf_dict(torch_dtype=dtype_name(np_dtype)),
                           max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    finally:
        bar.close()
    return Path(out)

"""Hugging Face Llama checkpoint directories <-> (LlamaConfig, params).

Loading is streamed: each parameter is built with `jax.make_array_from_callback`, and each device's
callback reads only that device's slice of the memory-mapped safetensors tensors (transposed and stacked
over layers as it goes). No process ever materialises the whole model on the host, and in a multi-host
run each process reads only the slices of its own devices.

Saving writes config.json plus safetensors shards and `model.safetensors.index.json` into a temporary
directory next to the target and renames it into place at the end, so a failed save leaves nothing
behind. Only process 0 writes; in a multi-host run the other processes take part in gathering each
tensor, one tensor at a time.

The name table `_llama_tensors` is the single place where jaxcollab's parameter tree meets the
Hugging Face tensor names (see DESIGN.md "File formats"): Llama, and Mixtral for mixtures of experts
(`block_sparse_moe.gate` is the router, `experts.E.w1/w3/w2` the gate/up/down projections).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jaxcollab.atomic import atomic_directory
from jaxcollab.model.config import LlamaConfig, dtype_name
from jaxcollab.model.llama import param_shapes, param_shardings
from jaxcollab.model.safetensors_io import CheckpointError, SafetensorsFile, TensorToWrite, write_safetensors
from jaxcollab.model.sharding import LOGICAL_RULES, Rules, single_device_mesh
from jaxcollab.trees import get_path, set_path

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Buffers some exporters include that carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorMap:
    """One parameter leaf and the HF tensors behind it.

    `hf_name` contains `{layer}` (and `{expert}`) for parameters stacked over layers (and experts): the
    leading axes of the parameter. `transpose`: the HF tensor is the transpose of the Flax kernel
    ([out, in] vs [in, out]).
    """

    path: tuple[str, ...]
    hf_name: str
    transpose: bool

    @property
    def stack_keys(self) -> tuple[str, ...]:
        return tuple(k for k in ("layer", "expert") if "{" + k + "}" in self.hf_name)

    def stack_indices(self, param_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Every index into the stacked axes, row-major (one per HF tensor)."""
        return [tuple(ix) for ix in np.ndindex(*param_shape[: len(self.stack_keys)])]

    def hf_name_at(self, index: tuple[int, ...]) -> str:
        return self.hf_name.format(**dict(zip(self.stack_keys, index, strict=True)))

    def hf_names(self, param_shape: tuple[int, ...]) -> list[str]:
        return [self.hf_name_at(ix) for ix in self.stack_indices(param_shape)]

    def hf_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = param_shape[len(self.stack_keys):]
        return tuple(reversed(shape)) if self.transpose else tuple(shape)


def _llama_tensors(cfg: LlamaConfig) -> list[TensorMap]:
    layer = "model.layers.{layer}."
    maps = [
        TensorMap(("embed_tokens", "embedding"), "model.embed_tokens.weight", False),
        TensorMap(("layers", "input_layernorm", "scale"), layer + "input_layernorm.weight", False),
        TensorMap(("layers", "post_attention_layernorm", "scale"), layer + "post_attention_layernorm.weight", False),
        *(
            TensorMap(("layers", "self_attn", p, "kernel"), layer + f"self_attn.{p}.weight", True)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        ),
        TensorMap(("norm", "scale"), "model.norm.weight", False),
    ]
    if cfg.is_moe:
        moe = layer + "block_sparse_moe."
        maps.append(TensorMap(("layers", "mlp", "router", "kernel"), moe + "gate.weight", True))
        maps.extend(
            TensorMap(("layers", "mlp", p, "kernel"), moe + "experts.{expert}." + w + ".weight", True)
            for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
        )
    else:
        maps.extend(
            TensorMap(("layers", "mlp", p, "kernel"), layer + f"mlp.{p}.weight", True)
            for p in ("gate_proj", "up_proj", "down_proj")
        )
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap(("lm_head", "kernel"), "lm_head.weight", True))
    return maps


# ------------------------------------------------------------------------------------------------ reading
class CheckpointDir:
    """The safetensors tensors of a HF model directory (single file or sharded with an index)."""

    def __init__(self, path: Path):
        self.path = path
        self._files: dict[str, SafetensorsFile] = {}
        index_path = path / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
            self.location: dict[str, str] = dict(weight_map)
            for shard in sorted(set(self.location.values())):
                if not (path / shard).is_file():
                    example = next(n for n, f in self.location.items() if f == shard)
                    raise CheckpointError(
                        f"{index_path} lists shard {shard!r} (e.g. for tensor {example!r}) but {path / shard}"
                        " does not exist; the download is incomplete"
                    )
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pth"))
                hint = (
                    f" It has {pickles}: pickle checkpoints are never loaded (they can run code); convert them"
                    " to safetensors first." if pickles else ""
                )
                raise CheckpointError(f"{path}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}).{hint}")
            self.location = {}
            for file in files:
                for name in self._file(file.name).names():
                    self.location[name] = file.name

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            self._files[name] = SafetensorsFile(self.path / name)
        return self._files[name]

    def names(self) -> list[str]:
        return list(self.location)

    def file_of(self, name: str) -> SafetensorsFile:
        if name not in self.location:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        file = self._file(self.location[name])
        if name not in file:
            raise CheckpointError(
                f"{self.path / INDEX_FILE} places tensor {name!r} in {file.path.name}, which does not contain it"
            )
        return file

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file_of(name).info(name).shape

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """One slice of a tensor, read from disk into a new array (nothing stays mapped)."""
        return self.file_of(name).read(name, index)

    def source_of(self, name: str) -> str:
        return str(self.path / self.location.get(name, "?"))


def _slice_reader(
    ckpt: CheckpointDir, tmap: TensorMap, shape: tuple[int, ...], dtype: np.dtype
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """A `make_array_from_callback` callback: reads one device's index of the stacked/transposed param."""
    n_stack = len(tmap.stack_keys)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        outer = [range(size)[sl] for size, sl in zip(shape[:n_stack], index[:n_stack], strict=True)]
        inner = index[n_stack:]
        pieces = []
        for stack_index in np.ndindex(*(len(r) for r in outer)):
            name = tmap.hf_name_at(tuple(r[i] for r, i in zip(outer, stack_index, strict=True)))
            piece = ckpt.read(name, tuple(reversed(inner))).T if tmap.transpose else ckpt.read(name, inner)
            pieces.append(np.asarray(piece, dtype=dtype))
        if not n_stack:
            return pieces[0]
        return np.stack(pieces).reshape(*(len(r) for r in outer), *pieces[0].shape)

    return read


def _check_shapes(
    ckpt: CheckpointDir, cfg: LlamaConfig, tmaps: list[TensorMap], shapes: dict, config_path: Path
) -> None:
    present = set(ckpt.names())
    names = {t: t.hf_names(get_path(shapes, t.path).shape) for t in tmaps}
    missing = [n for t in tmaps for n in names[t] if n not in present]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{ckpt.path}: tensors required by {config_path} are missing: {shown}")
    for tmap in tmaps:
        expected = tmap.hf_shape(get_path(shapes, tmap.path).shape)
        for name in names[tmap]:
            actual = ckpt.shape(name)
            if tuple(actual) != expected:
                raise CheckpointError(
                    f"{ckpt.source_of(name)}: tensor {name!r} has shape {list(actual)} but {config_path}"
                    f" (hidden_size={cfg.hidden_size}, intermediate_size={cfg.intermediate_size},"
                    f" heads={cfg.num_heads}, kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim},"
                    f" vocab_size={cfg.vocab_size}) implies {list(expected)}"
                )
    used = {n for t in tmaps for n in names[t]}
    unused = sorted(n for n in present - used if not n.endswith(_IGNORED_SUFFIXES))
    if unused:
        logger.warning("%s: ignoring %d tensors not used by a Llama model, e.g. %s", ckpt.path, len(unused), unused[:4])


def load_hf(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    *,
    compute_dtype: Any = None,
    rules: Rules = LOGICAL_RULES,
    **runtime: Any,
) -> tuple[LlamaConfig, dict]:
    """Load a HF Llama or Mixtral directory into (cfg, params) with parameters stored in `dtype`.

    With `mesh`, every parameter is created directly with its `NamedSharding` (from the logical-axis
    `rules`), each device's slice read straight from the safetensors files. Without one, parameters land
    on the default device. `compute_dtype` (default: `dtype`) and other `runtime` fields (e.g.
    `remat_policy`) go into the returned config.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory; load_hf expects a Hugging Face model directory")
    storage = dtype_name(dtype)
    cfg = LlamaConfig.from_pretrained_dir(
        path, param_dtype=storage, dtype=dtype_name(compute_dtype or dtype), **runtime
    )
    ckpt = CheckpointDir(path)
    tmaps = _llama_tensors(cfg)
    shapes = param_shapes(cfg)
    _check_shapes(ckpt, cfg, tmaps, shapes, path / "config.json")

    shardings = param_shardings(cfg, mesh or single_device_mesh(), rules)
    np_dtype = np.dtype(cfg.storage_dtype)
    params: dict = {}
    for tmap in tmaps:
        shape = get_path(shapes, tmap.path).shape
        sharding: NamedSharding = get_path(shardings, tmap.path)
        array = jax.make_array_from_callback(shape, sharding, _slice_reader(ckpt, tmap, shape, np_dtype))
        set_path(params, tmap.path, array)
    return cfg, params


# ------------------------------------------------------------------------------------------------ writing
def _host_array(value: jax.Array, index: tuple[int, ...]) -> np.ndarray:
    """One (layer / expert of a) parameter gathered to host memory; a collective in multi-host runs."""
    x = value[index] if index else value
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _tensors_to_write(cfg: LlamaConfig, params: dict, np_dtype: np.dtype) -> Iterator[TensorToWrite]:
    for tmap in _llama_tensors(cfg):
        value = get_path(params, tmap.path)
        for index in tmap.stack_indices(tuple(value.shape)):

            def produce(value: jax.Array = value, index: tuple = index, tmap: TensorMap = tmap) -> np.ndarray:
                host = _host_array(value, index)
                return (host.T if tmap.transpose else host).astype(np_dtype)

            yield TensorToWrite(tmap.hf_name_at(index), tmap.hf_shape(tuple(value.shape)), np_dtype, produce)


def _validate_params(cfg: LlamaConfig, params: dict) -> None:
    expected = param_shapes(cfg)
    exp_paths = {tuple(k.key for k in p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got_paths = {tuple(k.key for k in p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(set(exp_paths) - set(got_paths))
    extra = sorted(set(got_paths) - set(exp_paths))
    if missing or extra:
        raise ValueError(
            f"params do not match the config: missing {['/'.join(p) for p in missing]},"
            f" unexpected {['/'.join(p) for p in extra]}"
        )
    for p, shape in exp_paths.items():
        if tuple(got_paths[p]) != tuple(shape):
            raise ValueError(f"params['{'/'.join(p)}'] has shape {got_paths[p]} but the config implies {shape}")


def save_hf(
    cfg: LlamaConfig,
    params: dict,
    out_dir: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a HF Llama (or, for a mixture of experts, Mixtral) directory that
    `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Tensors are stored in `dtype` (default: the config's storage dtype). The directory appears complete
    or not at all. An existing non-empty `out_dir` is an error unless `overwrite`.
    """
    out_dir = Path(out_dir)
    _validate_params(cfg, params)
    np_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else np.dtype(cfg.storage_dtype)
    tensors = list(_tensors_to_write(cfg, params, np_dtype))
    shards: list[list[TensorToWrite]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    if jax.process_index() == 0:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            for file_name, shard in zip(names, shards, strict=True):
                write_safetensors(tmp / file_name, shard, {"format": "pt"})
            weight_map = {t.name: file_name for file_name, shard in zip(names, shards, strict=True) for t in shard}
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            hf_config = cfg.to_hf_dict(torch_dtype=dtype_name(np_dtype))
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    else:  # take part in the per-tensor gathers without writing
        for t in tensors:
            t.produce()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_hf:{out_dir}")
    return out_dir

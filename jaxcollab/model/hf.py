"""Hugging Face Llama checkpoint directories <-> (LlamaConfig, params).

Loading is streamed: each parameter is built with `jax.make_array_from_callback` in the checkpoint's
own layout and dtype, each device's callback reading only that device's slice of the safetensors tensors
with positioned reads (stacked over layers as it goes); kernels are then transposed and cast on the
devices, where that is an order of magnitude faster than on the host. No process ever materialises the
whole model on the host, and in a multi-host run each process reads only the slices of its own devices.
Saving likewise transposes and casts each tensor on the devices before gathering it.

Saving writes config.json plus safetensors shards and `model.safetensors.index.json` into a temporary
directory next to the target and renames it into place at the end, so a failed save leaves nothing
behind. Only process 0 writes; in a multi-host run the other processes take part in gathering each
tensor, one tensor at a time.

The name table `_llama_tensors` is the single place where jaxcollab's parameter tree meets the
Hugging Face tensor names (see DESIGN.md "File formats"): Llama, and Mixtral for mixtures of experts
(`block_sparse_moe.gate` is the router, `experts.E.w1/w3/w2` the gate/up/down projections).
"""

from __future__ import annotations

import functools
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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

    def read(self, name: str, index: tuple[slice, ...], out: np.ndarray | None = None) -> np.ndarray:
        """One slice of a tensor, read from disk into a new array or into `out` (nothing stays mapped)."""
        return self.file_of(name).read(name, index, out=out)

    def source_of(self, name: str) -> str:
        return str(self.path / self.location.get(name, "?"))


_HOST_ALIGNMENT = 64  # bytes; XLA's CPU client uses host buffers aligned like this in place instead of copying


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a `_HOST_ALIGNMENT` boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + _HOST_ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _HOST_ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _slice_reader(
    ckpt: CheckpointDir, tmap: TensorMap, shape: tuple[int, ...], dtype: np.dtype
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """A `make_array_from_callback` callback: one device's index of the layer-stacked parameter in the HF
    layout (`shape` is that stacked HF shape), as `dtype`."""
    n_stack = len(tmap.stack_keys)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        outer = [range(size)[sl] for size, sl in zip(shape[:n_stack], index[:n_stack], strict=True)]
        inner = index[n_stack:]

        def name_at(stack_index: tuple[int, ...]) -> str:
            return tmap.hf_name_at(tuple(r[i] for r, i in zip(outer, stack_index, strict=True)))

        # Each layer's slice is read straight into its place in one array, allocated so that the CPU backend
        # adopts it without a copy: the host holds this device's slice and nothing else.
        inner_shape = [len(range(size)[sl]) for size, sl in zip(shape[n_stack:], inner, strict=True)]
        out = _aligned_empty((*(len(r) for r in outer), *inner_shape), dtype)
        for stack_index in np.ndindex(*(len(r) for r in outer)):
            ckpt.read(name_at(stack_index), inner, out=out[stack_index] if stack_index else out)
        return out

    return read


# Floating dtypes read as they are stored; anything else is converted on the host while reading.
_DEVICE_CONVERTIBLE = tuple(np.dtype(t) for t in (jnp.float32, jnp.bfloat16, jnp.float16))


@functools.cache
def _to_param_layout(sharding: NamedSharding, transpose: bool, dtype: np.dtype) -> Callable[[jax.Array], jax.Array]:
    """Jitted: an array in the HF layout and file dtype -> the parameter (kernels transposed, cast), placed
    with `sharding`. Transposes and casts run on the devices, where they are far faster than on the host."""

    def convert(x: jax.Array) -> jax.Array:
        return (jnp.swapaxes(x, -1, -2) if transpose else x).astype(dtype)

    return jax.jit(convert, out_shardings=sharding)


def _hf_layout_sharding(sharding: NamedSharding, ndim: int) -> NamedSharding:
    """`sharding` of a parameter, with its last two axes swapped (the sharding of its HF-layout transpose)."""
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[:-2], spec[-1], spec[-2]))


def _load_param(ckpt: CheckpointDir, tmap: TensorMap, shape: tuple[int, ...], sharding: NamedSharding,
                dtype: np.dtype) -> jax.Array:
    """One parameter: each device's slice read in the HF layout and the file's dtype, then laid out on device."""
    n_stack = len(tmap.stack_keys)
    first = tmap.hf_name_at((0,) * n_stack)
    file_dtype = ckpt.file_of(first).info(first).dtype
    read_dtype = file_dtype if file_dtype in _DEVICE_CONVERTIBLE else dtype
    hf_shape = (*shape[:n_stack], *tmap.hf_shape(shape))
    hf_sharding = _hf_layout_sharding(sharding, len(shape)) if tmap.transpose else sharding
    raw = jax.make_array_from_callback(hf_shape, hf_sharding, _slice_reader(ckpt, tmap, hf_shape, read_dtype))
    if not tmap.transpose and read_dtype == dtype:
        return raw
    # Wait for the conversion so that the HF-layout copy is freed before the next parameter is read: at
    # most one such copy exists at a time (on a CPU, device memory is host memory).
    return _to_param_layout(sharding, tmap.transpose, dtype)(raw).block_until_ready()


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


def hf_tensor_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor of a model with `cfg`, in the order `save_hf` writes them, with its shape."""
    shapes = param_shapes(cfg)
    out: dict[str, tuple[int, ...]] = {}
    for tmap in _llama_tensors(cfg):
        shape = tuple(get_path(shapes, tmap.path).shape)
        out.update((name, tmap.hf_shape(shape)) for name in tmap.hf_names(shape))
    return out


def open_checkpoint(path: str | os.PathLike, cfg: LlamaConfig) -> CheckpointDir:
    """The safetensors tensors of HF directory `path`, checked to hold every tensor of `cfg` with its shape."""
    path = Path(path)
    ckpt = CheckpointDir(path)
    _check_shapes(ckpt, cfg, _llama_tensors(cfg), param_shapes(cfg), path / "config.json")
    return ckpt


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
    ckpt = open_checkpoint(path, cfg)
    tmaps = _llama_tensors(cfg)
    shapes = param_shapes(cfg)

    shardings = param_shardings(cfg, mesh or single_device_mesh(), rules)
    np_dtype = np.dtype(cfg.storage_dtype)
    params: dict = {}
    for tmap in tmaps:
        shape = get_path(shapes, tmap.path).shape
        sharding: NamedSharding = get_path(shardings, tmap.path)
        set_path(params, tmap.path, _load_param(ckpt, tmap, shape, sharding, np_dtype))
    return cfg, params


# ------------------------------------------------------------------------------------------------ writing
@functools.partial(jax.jit, static_argnames=("transpose", "dtype"))
def _to_hf_layout(x: jax.Array, transpose: bool, dtype: np.dtype) -> jax.Array:
    """One (layer / expert of a) parameter in the HF layout and `dtype`, computed on the devices."""
    return (x.T if transpose else x).astype(dtype)


def _host_array(x: jax.Array) -> np.ndarray:
    """An array gathered to host memory; a collective in multi-host runs."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _tensors_to_write(cfg: LlamaConfig, params: dict, np_dtype: np.dtype) -> Iterator[TensorToWrite]:
    for tmap in _llama_tensors(cfg):
        value = get_path(params, tmap.path)
        for index in tmap.stack_indices(tuple(value.shape)):

            def produce(value: jax.Array = value, index: tuple = index, tmap: TensorMap = tmap) -> np.ndarray:
                device_dtype = np_dtype if np_dtype in _DEVICE_CONVERTIBLE else np.dtype(value.dtype)
                x = _to_hf_layout(value[index] if index else value, tmap.transpose, device_dtype)
                return _host_array(x).astype(np_dtype, copy=False)

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


def write_hf_directory(
    out_dir: Path, tensors: list[TensorToWrite], hf_config: dict, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> None:
    """Write `tensors` (in order, each produced when its turn comes) as safetensors shards of at most
    `max_shard_bytes`, with `model.safetensors.index.json` and `hf_config` as config.json, atomically."""
    shards: list[list[TensorToWrite]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for file_name, shard in zip(names, shards, strict=True):
            write_safetensors(tmp / file_name, shard, {"format": "pt"})
        weight_map = {t.name: file_name for file_name, shard in zip(names, shards, strict=True) for t in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


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
    hf_config = cfg.to_hf_dict(torch_dtype=dtype_name(np_dtype))
    if jax.process_index() == 0:
        write_hf_directory(out_dir, tensors, hf_config, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    else:  # take part in the per-tensor gathers without writing
        for t in tensors:
            t.produce()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_hf:{out_dir}")
    return out_dir

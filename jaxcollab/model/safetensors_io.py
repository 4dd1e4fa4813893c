"""Reading and writing safetensors files without holding a whole model in host memory.

Reading gives either a memory-mapped zero-copy view of a tensor (`tensor`), or one slice of it read with
positioned reads into a fresh array or the caller's (`read`): only the rows the slice covers are read, and nothing stays
mapped afterwards, so loading a model slice by slice never keeps the files' pages resident. Every header
is validated against the file size first, so a truncated or corrupt file fails with an error that names
the file and the tensor. Writing streams one tensor at a time into a file whose header is computed up front from shapes.
bfloat16 and float8 come from `ml_dtypes` (what JAX uses), so no framework is needed to read them.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read as what it claims to be."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset inside the data section
    end: int


class SafetensorsFile:
    """A validated safetensors file: `.read(name, index)` reads a slice; `.tensor(name)` maps the whole tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata, self._data_start = _read_header(self.path)
        self._mmap: np.memmap | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return self.tensors[name]

    def read(self, name: str, index: tuple[slice, ...] = (), out: np.ndarray | None = None) -> np.ndarray:
        """`tensor[index]` (basic slices only), reading just the rows of the first axis it spans.

        Into a fresh array, or into `out` (of the slice's shape): when the slice is whole rows and `out`
        is contiguous in the file's dtype, the bytes are read straight into it with no intermediate copy.
        """
        info = self.info(name)
        index = tuple(index) + (slice(None),) * (len(info.shape) - len(index))
        if not info.shape:
            rows, rest = range(1), ()
        else:
            rows, rest = range(info.shape[0])[index[0]], index[1:]
            if rows.step != 1:
                raise ValueError(f"{self.path}: tensor {name!r}: only contiguous slices can be read, got {index}")
        whole_rows = all(sl == slice(None) for sl in rest)
        direct = (out is not None and bool(info.shape) and whole_rows and out.dtype == info.dtype
                  and out.flags.c_contiguous and out.shape == (len(rows), *info.shape[1:]))
        row_bytes = int(np.prod(info.shape[1:], dtype=np.int64)) * info.dtype.itemsize
        count = len(rows) * row_bytes
        buffer = out.reshape(-1).view(np.uint8) if direct else np.empty(count, np.uint8)
        start = self._data_start + info.begin + (rows.start if len(rows) else 0) * row_bytes
        with self.path.open("rb", buffering=0) as f:
            view, done = memoryview(buffer), 0
            while done < count:
                got = os.preadv(f.fileno(), [view[done:]], start + done)
                if got <= 0:
                    raise CheckpointError(f"{self.path}: tensor {name!r}: the file ended early (truncated?)")
                done += got
        if direct:
            return out
        block = buffer.view(info.dtype).reshape((len(rows), *info.shape[1:]) if info.shape else ())
        result = block[(slice(None), *rest)] if info.shape else block
        if out is None:
            return result
        out[...] = result
        return out

    def tensor(self, name: str) -> np.ndarray:
        """A zero-copy view; slicing it reads only the touched pages."""
        info = self.info(name)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self._data_start + info.begin : self._data_start + info.end]
        return raw.view(info.dtype).reshape(info.shape)


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: safetensors file not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: only {size} bytes, too short to be a safetensors file (truncated?)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: header claims {header_len} bytes but the file has {size}; the file is truncated or"
                " not a safetensors file"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    data_start = 8 + header_len
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} {entry['dtype']}{list(shape)} needs {expected} bytes but its offsets"
                f" span {end - begin}; the file is corrupt"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {end} of the data section, which has only {data_size}"
                " bytes; the file is truncated"
            )
        tensors[name] = TensorInfo(name, dtype, shape, begin, end)
    return tensors, metadata, data_start


@dataclass(frozen=True)
class TensorToWrite:
    """One tensor of a file being written: its header facts now, its bytes from `produce()` later."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors(
    path: str | Path, tensors: Iterable[TensorToWrite], metadata: Mapping[str, str] | None = None
) -> None:
    """Stream `tensors` into `path` in order; each `produce()` is called once and may be freed after."""
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        dtype = np.dtype(t.dtype)
        if dtype not in _CODES:
            raise CheckpointError(f"{path}: tensor {t.name!r} has dtype {dtype}, which safetensors cannot store")
        header[t.name] = {"dtype": _CODES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors:
            array = np.ascontiguousarray(t.produce(), dtype=t.dtype)
            if array.shape != tuple(t.shape):
                raise CheckpointError(
                    f"{path}: tensor {t.name!r} produced shape {array.shape}, announced {tuple(t.shape)}"
                )
            f.write(array.reshape(-1).view(np.uint8).data)  # the array's own bytes, no copy

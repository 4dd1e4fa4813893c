"""The streaming safetensors reader/writer agree with the reference `safetensors` library."""

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxcollab.model.safetensors_io import CheckpointError, SafetensorsFile, TensorToWrite, write_safetensors

ARRAYS = {
    "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b": np.array([[1.5, -2.25]], dtype=ml_dtypes.bfloat16),
    "c": np.arange(5, dtype=np.int64),
    "half": np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3),
    "empty": np.zeros((0, 3), np.float32),
}


def test_reader_reads_reference_files(tmp_path):
    path = tmp_path / "ref.safetensors"
    save_file(ARRAYS, path, metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert sorted(f.names()) == sorted(ARRAYS) and f.metadata == {"format": "pt"}
    for name, value in ARRAYS.items():
        got = f.tensor(name)
        assert got.dtype == value.dtype and got.shape == value.shape
        assert np.array_equal(got.view(np.uint8), value.view(np.uint8))
    assert np.array_equal(f.tensor("a.weight")[1:, 2:], ARRAYS["a.weight"][1:, 2:])


def test_writer_output_is_read_by_reference_library(tmp_path):
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, [TensorToWrite(k, v.shape, v.dtype, lambda v=v: v) for k, v in ARRAYS.items()])
    loaded = load_file(path)
    assert sorted(loaded) == sorted(ARRAYS)
    for name, value in ARRAYS.items():
        assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name].view(np.uint8), value.view(np.uint8))


def test_writer_rejects_a_tensor_that_breaks_its_announced_shape(tmp_path):
    with pytest.raises(CheckpointError, match="'x' produced shape"):
        write_safetensors(tmp_path / "x.safetensors", [TensorToWrite("x", (2, 2), np.float32, lambda: np.zeros(3))])


def test_offsets_inconsistent_with_shape_are_reported(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"x": np.zeros((2, 2), np.float32)}, path)
    raw = path.read_bytes().replace(b'"shape":[2,2]', b'"shape":[2,3]')
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match="'x'.*needs 24 bytes"):
        SafetensorsFile(path)

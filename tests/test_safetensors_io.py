"""The streaming safetensors reader/writer agree with the reference `safetensors` library."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
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


@given(st.data())
def test_read_slices_equal_numpy_slicing(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("read") / "t.safetensors"
    shape = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    values = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    save_file({"x": values.astype(ml_dtypes.bfloat16), "y": values}, path)
    index = tuple(slice(data.draw(st.integers(0, n)), data.draw(st.integers(0, n))) for n in shape)
    index = index[: data.draw(st.integers(0, len(shape)))]
    f = SafetensorsFile(path)
    for name in ("x", "y"):
        got = f.read(name, index)
        expected = f.tensor(name)[index]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(expected).view(np.uint8))
        # into a caller's array: the file's dtype (read in place when whole rows) or another (converted)
        for out_dtype in (expected.dtype, np.float32):
            out = np.full(expected.shape, -1, out_dtype)
            assert f.read(name, index, out=out) is out
            assert np.array_equal(out, values[index])


def test_load_hf_maps_no_file(tmp_path, monkeypatch):
    """Device slices are read with positioned reads; no memory map keeps the checkpoint resident."""
    from conftest import build_hf_llama

    from jaxcollab import model

    build_hf_llama(tmp_path / "m", max_shard_size="20KB")

    def refuse(*args, **kwargs):
        raise AssertionError("load_hf memory-mapped a checkpoint file")

    monkeypatch.setattr(np, "memmap", refuse)
    cfg, params = model.load_hf(tmp_path / "m")
    assert params["layers"]["mlp"]["down_proj"]["kernel"].shape == (2, 48, 32)

"""Hugging Face directories: round trips, format variants (4.x/5.x configs, shards, bf16) and clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err, torch_logits
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from jaxcollab import model
from jaxcollab.model import hf as hf_io

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 5000.0}


def all_tensors(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def tokens(batch=2, length=40, seed=0):
    return np.random.RandomState(seed).randint(0, 64, size=(batch, length)).astype(np.int32)


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_gives_identical_tensors_and_logits(hf_llama, tmp_path, tied):
    src, reference = hf_llama(tie_word_embeddings=tied, num_key_value_heads=1, rope_parameters=LLAMA3_ROPE)
    cfg, params = model.load_hf(src)
    out = model.save_hf(cfg, params, tmp_path / "exported", max_shard_bytes=20_000)
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()

    original, exported = all_tensors(src), all_tensors(out)
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"
    x = tokens()
    assert np.array_equal(torch_logits(reloaded, x), torch_logits(reference, x))


def test_sharded_checkpoint_with_index_loads(hf_llama):
    src, reference = hf_llama(max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    cfg, params = model.load_hf(src)
    x = tokens()
    assert rel_err(model.forward(cfg, params, x), torch_logits(reference, x)) <= 1e-5


def test_bf16_checkpoint_loads_into_either_storage_dtype(hf_llama, tmp_path):
    src, reference = hf_llama()
    reference = reference.to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "bf16")
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    assert str(stored["model.norm.weight"].dtype) == "bfloat16"
    cfg32, p32 = model.load_hf(tmp_path / "bf16", dtype=jnp.float32)
    cfg16, p16 = model.load_hf(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert p16["norm"]["scale"].dtype == jnp.bfloat16 and p32["norm"]["scale"].dtype == jnp.float32
    # bf16 -> fp32 is exact, so both hold the same numbers.
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b.astype(jnp.float32)))
    # Saving the bf16 params gives back the bf16 file bit for bit.
    out = model.save_hf(cfg16, p16, tmp_path / "bf16_out")
    for name, value in all_tensors(out).items():
        assert np.array_equal(value.view(np.uint16), stored[name].view(np.uint16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_transformers_4x_config_spelling_reads_the_same(hf_llama, tmp_path):
    src, _ = hf_llama(num_key_value_heads=1, rope_parameters=LLAMA3_ROPE)
    v5 = json.loads((src / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
    v4.update(rope_theta=5000.0, torch_dtype="float32", transformers_version="4.46.0",
              rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"})
    legacy = tmp_path / "legacy"
    shutil.copytree(src, legacy)
    (legacy / "config.json").write_text(json.dumps(v4))
    cfg5, p5 = model.load_hf(src)
    cfg4, p4 = model.load_hf(legacy)
    assert cfg4 == cfg5 and cfg4.rope_scaling is not None and cfg4.rope_theta == 5000.0
    x = tokens()
    assert np.array_equal(model.forward(cfg4, p4, x), model.forward(cfg5, p5, x))
    # Oldest spelling: "type" instead of "rope_type", no rope_scaling at all means default RoPE.
    oldest = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_theta", "rope_type")}
    v4["rope_scaling"] = {"type": "llama3", **oldest}
    assert model.LlamaConfig.from_hf_dict(v4).rope_scaling == cfg5.rope_scaling
    v4["rope_scaling"] = None
    assert model.LlamaConfig.from_hf_dict(v4).rope_scaling is None


def test_written_config_reads_back_equal(hf_llama):
    src, _ = hf_llama(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE, eos_token_id=[2, 5], bos_token_id=1)
    cfg, _ = model.load_hf(src)
    assert cfg.eos_token_id == (2, 5)
    assert model.LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_save_refuses_to_clobber_unless_overwrite(hf_llama, tmp_path):
    src, _ = hf_llama()
    cfg, params = model.load_hf(src)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        model.save_hf(cfg, params, target)
    assert (target / "keep.txt").read_text() == "user data"
    model.save_hf(cfg, params, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_llama_0", "out"]


# ------------------------------------------------------------------------------------------------- errors
def test_missing_config_json(hf_llama):
    src, _ = hf_llama()
    (src / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        model.load_hf(src)


def test_unsupported_model_type(hf_llama):
    src, _ = hf_llama()
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(model.ConfigError, match=r"model_type='gpt2'.*not supported"):
        model.load_hf(src)


def test_unsupported_rope_type(hf_llama):
    src, _ = hf_llama(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(model.ConfigError, match="rope_type='yarn'"):
        model.load_hf(src)


def test_missing_shard_listed_in_index(hf_llama):
    src, _ = hf_llama(max_shard_size="20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (src / victim).unlink()
    with pytest.raises(model.CheckpointError, match=f"{victim}.*does not exist"):
        model.load_hf(src)


def test_truncated_safetensors(hf_llama):
    src, _ = hf_llama()
    file = src / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(model.CheckpointError, match=r"model\.safetensors.*truncated"):
        model.load_hf(src)
    file.write_bytes(data[:5])
    with pytest.raises(model.CheckpointError, match=r"model\.safetensors.*too short"):
        model.load_hf(src)


def test_corrupt_safetensors_header(hf_llama):
    src, _ = hf_llama()
    file = src / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:24] = b"\xff\xfe not json!!!!!"
    file.write_bytes(bytes(data))
    with pytest.raises(model.CheckpointError, match=r"model\.safetensors.*corrupt"):
        model.load_hf(src)


def test_tensor_shape_contradicting_config(hf_llama):
    src, _ = hf_llama()
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 40
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(model.CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \[48, 32\].*"
                       r"config.json.*implies \[40, 32\]"):
        model.load_hf(src)


def test_missing_tensor(hf_llama, tmp_path):
    src, _ = hf_llama()
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    from safetensors.numpy import save_file
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(model.CheckpointError, match="model.layers.1.post_attention_layernorm.weight"):
        model.load_hf(src)


def test_pickle_only_directory_is_refused(hf_llama):
    src, _ = hf_llama()
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(model.CheckpointError, match=r"pytorch_model.bin.*pickle"):
        model.load_hf(src)


def test_failed_save_writes_nothing(hf_llama, tmp_path, monkeypatch):
    src, _ = hf_llama()
    cfg, params = model.load_hf(src)
    before = sorted(p.name for p in tmp_path.iterdir())

    bad = jax.tree.map(lambda x: x, params)
    bad["norm"]["scale"] = jnp.ones((7,))
    with pytest.raises(ValueError, match="norm/scale"):
        model.save_hf(cfg, bad, tmp_path / "bad_shape")

    calls = []
    real_write = hf_io.write_safetensors

    def fail_on_second_shard(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(hf_io, "write_safetensors", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        model.save_hf(cfg, params, tmp_path / "interrupted", max_shard_bytes=20_000)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before

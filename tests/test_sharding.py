"""Loading straight into a 2x2x2 (data, fsdp, tensor) mesh of 8 CPU devices, and the sharding rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from jaxcollab import model
from jaxcollab.model import hf as hf_io
from jaxcollab.model import sharding
from jaxcollab.trees import get_path

SHARDABLE = dict(num_attention_heads=4, num_key_value_heads=1, hidden_size=32, intermediate_size=48,
                 vocab_size=64, num_hidden_layers=3)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "conftest.py should have made 8 CPU devices"
    return model.make_mesh(model.MeshConfig(data=2, fsdp=2, tensor=2))


def tokens(batch, length=24, seed=0):
    return np.random.RandomState(seed).randint(0, 64, size=(batch, length)).astype(np.int32)


def test_load_into_mesh_gives_intended_shardings(hf_llama, mesh, monkeypatch):
    src, _ = hf_llama(**SHARDABLE)
    largest_read = {}
    real = jax.make_array_from_callback

    def recording(shape, sharding_, callback):
        def wrapped(index):
            piece = callback(index)
            largest_read[shape] = max(largest_read.get(shape, 0), piece.size)
            return piece
        return real(shape, sharding_, wrapped)

    monkeypatch.setattr(hf_io.jax, "make_array_from_callback", recording)
    cfg, params = model.load_hf(src, mesh=mesh)

    expected = {
        ("embed_tokens", "embedding"): P("tensor", "fsdp"),
        ("layers", "self_attn", "q_proj", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "self_attn", "k_proj", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "self_attn", "o_proj", "kernel"): P(None, "tensor", "fsdp"),
        ("layers", "mlp", "gate_proj", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "down_proj", "kernel"): P(None, "tensor", "fsdp"),
        ("layers", "input_layernorm", "scale"): P(),
        ("norm", "scale"): P(),
        ("lm_head", "kernel"): P("fsdp", "tensor"),
    }
    for path, spec in expected.items():
        leaf = get_path(params, path)
        assert leaf.sharding.mesh == mesh and leaf.sharding.spec == spec, path
        assert len(leaf.sharding.device_set) == 8
    # Every sharded parameter was read one device slice at a time, never whole.
    q_shape = get_path(params, ("layers", "self_attn", "q_proj", "kernel")).shape
    assert largest_read[q_shape] == np.prod(q_shape) // 4


def test_sharded_forward_equals_single_device(hf_llama, mesh):
    src, _ = hf_llama(**SHARDABLE)
    cfg, single = model.load_hf(src)
    _, sharded = model.load_hf(src, mesh=mesh)
    x = tokens(4)
    expected = np.asarray(model.forward(cfg, single, x))

    batch = sharding.shard_batch({"tokens": x}, mesh)["tokens"]
    assert batch.sharding.spec == P(("data", "fsdp"))
    with jax.set_mesh(mesh):  # activates the logical activation constraints inside the model
        logits = model.forward(cfg, sharded, batch)
    assert logits.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
    # And without an active mesh, sharding propagates from the inputs alone.
    np.testing.assert_allclose(np.asarray(model.forward(cfg, sharded, batch)), expected, rtol=1e-5, atol=1e-5)


def test_indivisible_dimensions_are_replicated(hf_llama, mesh):
    src, reference = hf_llama(**{**SHARDABLE, "vocab_size": 63})
    cfg, params = model.load_hf(src, mesh=mesh)
    assert params["embed_tokens"]["embedding"].sharding.spec == P(None, "fsdp")
    assert params["lm_head"]["kernel"].sharding.spec == P("fsdp")
    x = tokens(2) % 63
    single_cfg, single = model.load_hf(src)
    np.testing.assert_allclose(model.forward(cfg, params, x), model.forward(single_cfg, single, x),
                               rtol=1e-5, atol=1e-5)


def test_bf16_load_into_mesh(hf_llama, mesh):
    src, _ = hf_llama(**SHARDABLE)
    cfg, params = model.load_hf(src, dtype=jnp.bfloat16, mesh=mesh)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert model.forward(cfg, params, tokens(2)).dtype == jnp.float32


def test_save_from_sharded_params_round_trips(hf_llama, mesh, tmp_path):
    src, _ = hf_llama(**SHARDABLE)
    cfg, params = model.load_hf(src, mesh=mesh)
    out = model.save_hf(cfg, params, tmp_path / "from_mesh")
    cfg2, params2 = model.load_hf(out)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_logical_to_spec_rules():
    mesh = model.make_mesh(model.MeshConfig(data=2, fsdp=2, tensor=2))
    assert sharding.logical_to_spec(("batch", "length", "act_embed")) == P(("data", "fsdp"))
    spec = sharding.logical_to_spec(("layers", "embed", "mlp"), shape=(3, 32, 48), mesh=mesh)
    assert spec == P(None, "fsdp", "tensor")
    # A mesh axis is used at most once per array.
    rules = (("a", "tensor"), ("b", "tensor"))
    assert sharding.logical_to_spec(("a", "b"), rules) == P("tensor")
    # Axes of size 1 are dropped, so specs stay minimal on small meshes.
    small = model.make_mesh(model.MeshConfig(data=1, fsdp=8, tensor=1))
    assert sharding.logical_to_spec(("vocab", "embed"), shape=(64, 32), mesh=small) == P(None, "fsdp")
    with pytest.raises(KeyError, match="no rule"):
        sharding.logical_to_spec(("nonsense",))


@given(
    data=st.sampled_from([1, 2, 4, -1]), fsdp=st.sampled_from([1, 2, 4, 8, -1]), tensor=st.sampled_from([1, 2, -1])
)
def test_mesh_config_resolves_or_explains(data, fsdp, tensor):
    cfg = model.MeshConfig(data, fsdp, tensor)
    sizes = [data, fsdp, tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    valid = sizes.count(-1) <= 1 and (8 % known == 0 if -1 in sizes else known == 8)
    if valid:
        resolved = cfg.resolve(8)
        assert np.prod(resolved) == 8
        assert all(r == s for r, s in zip(resolved, sizes, strict=True) if s != -1)
    else:
        with pytest.raises(ValueError, match="mesh"):
            cfg.resolve(8)


def test_make_mesh_from_mapping_rejects_unknown_axes():
    assert model.make_mesh({"tensor": 2}).shape == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="unknown mesh axes"):
        model.make_mesh({"model": 2})

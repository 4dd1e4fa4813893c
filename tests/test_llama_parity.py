"""The Flax Llama gives transformers' logits (fp32 to 1e-5, bf16 to 2e-2) on varied tiny configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, torch_logits

from jaxcollab import model

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

CONFIGS = {
    "multi_head_untied": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-6),
    "gqa_tied": dict(
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
        rms_norm_eps=1e-5, num_hidden_layers=3,
    ),
    "one_kv_head_llama3_rope": dict(
        num_attention_heads=4, num_key_value_heads=1, rope_parameters={**LLAMA3_SCALING, "rope_theta": 5000.0},
        rms_norm_eps=1e-5,
    ),
    "head_dim_override_tied_llama3": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rms_norm_eps=3e-6,
        rope_parameters={**LLAMA3_SCALING, "factor": 4.0, "high_freq_factor": 2.0, "rope_theta": 1e6},
    ),
}
SEQ_LEN = 48  # longer than original_max_position_embeddings=16 of the llama3-scaled configs


def random_tokens(batch: int, length: int, vocab: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, size=(batch, length)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_logits_match_transformers(hf_llama, name):
    path, reference = hf_llama(**CONFIGS[name])
    cfg, params = model.load_hf(path, dtype=jnp.float32)
    tokens = random_tokens(3, SEQ_LEN)
    expected = torch_logits(reference, tokens)
    logits = model.forward(cfg, params, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (3, SEQ_LEN, 64)
    assert rel_err(logits, expected) <= 1e-5


def test_config_fields_follow_config_json(hf_llama):
    path, _ = hf_llama(**CONFIGS["head_dim_override_tied_llama3"])
    cfg, params = model.load_hf(path)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings) == (4, 2, 16, True)
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 3e-6
    assert cfg.rope_scaling == model.RopeScaling(4.0, 1.0, 2.0, 16)
    assert "lm_head" not in params
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 64)


@pytest.mark.parametrize("name", ["gqa_tied", "one_kv_head_llama3_rope"])
def test_left_padded_batch_with_attention_mask(hf_llama, name):
    path, reference = hf_llama(**CONFIGS[name])
    cfg, params = model.load_hf(path)
    tokens = random_tokens(3, SEQ_LEN, seed=1)
    mask = np.ones_like(tokens)
    mask[0, :11] = 0  # left padding of different lengths
    mask[1, :3] = 0
    tokens[mask == 0] = 0
    expected = torch_logits(reference, tokens, mask)
    logits = np.asarray(model.forward(cfg, params, tokens, attention_mask=mask))
    real = mask.astype(bool)
    assert np.isfinite(logits).all()
    assert rel_err(logits[real], expected[real]) <= 1e-5
    # The unpadded row is unaffected by the others' padding.
    assert rel_err(logits[2], torch_logits(reference, tokens[2:3])[0]) <= 1e-5


def test_packed_segments_equal_separate_sequences(hf_llama):
    path, reference = hf_llama(**CONFIGS["one_kv_head_llama3_rope"])
    cfg, params = model.load_hf(path)
    a, b = random_tokens(1, 20, seed=2), random_tokens(1, 25, seed=3)
    packed = np.concatenate([a, b, np.zeros((1, 3), np.int32)], axis=1)
    segments = np.array([[1] * 20 + [2] * 25 + [0] * 3], np.int32)
    logits = np.asarray(model.forward(cfg, params, packed, segment_ids=segments))
    assert rel_err(logits[0, :20], torch_logits(reference, a)[0]) <= 1e-5
    assert rel_err(logits[0, 20:45], torch_logits(reference, b)[0]) <= 1e-5


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_bf16_compute_within_bf16_tolerance(hf_llama, storage):
    path, reference = hf_llama(**CONFIGS["gqa_tied"])
    cfg, params = model.load_hf(path, dtype=storage, compute_dtype=jnp.bfloat16)
    assert cfg.dtype == "bfloat16" and cfg.param_dtype == storage
    assert all(x.dtype == jnp.dtype(storage) for x in jax.tree.leaves(params))
    tokens = random_tokens(2, SEQ_LEN, seed=4)
    logits = model.forward(cfg, params, tokens)
    assert logits.dtype == jnp.float32
    err = rel_err(logits, torch_logits(reference, tokens))
    assert 1e-6 < err <= 2e-2  # really computed in bf16, and still close


def _jaxpr(cfg, params, tokens):
    return jax.make_jaxpr(lambda p, t: model.forward(cfg, p, t))(params, tokens)


def test_layers_are_scanned_one_compiled_layer_for_any_depth():
    tokens = jnp.zeros((1, 8), jnp.int32)
    sizes = {}
    for depth in (1, 2, 7):
        cfg = model.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=depth,
                                num_heads=4, num_kv_heads=2)
        params = model.init_params(cfg, jax.random.key(0))
        text = str(_jaxpr(cfg, params, tokens))
        assert "scan[" in text and f"length={depth}" in text
        sizes[depth] = len(text.splitlines())
    assert sizes[1] == sizes[2] == sizes[7]


@pytest.mark.parametrize("loss_chunk", [0, 6])
@pytest.mark.parametrize("name", ["multi_head_untied", "gqa_tied"])
def test_fp32_gradients_of_every_parameter_match_torch_autograd(hf_llama, name, loss_chunk):
    """d(next-token cross-entropy)/d(every weight) against transformers' autograd (kernels transposed): the
    training objective's gradients (`train.make_gradients`), with whole logits and with the chunked head loss."""
    import torch

    from jaxcollab import train

    path, reference = hf_llama(**CONFIGS[name])
    cfg, params = model.load_hf(path, dtype=jnp.float32)
    tokens = random_tokens(3, 20, seed=2)
    ids = torch.tensor(tokens, dtype=torch.long)
    logits = reference(ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    expected = {n: p.grad.numpy() for n, p in reference.named_parameters()}

    variables = {"params": params}
    trainable, frozen = train.partition(variables, train.full_finetune_mask(variables))
    gradients = train.make_gradients(cfg, train.TrainConfig(loss_chunk=loss_chunk))
    batch = {"tokens": tokens, "loss_mask": np.ones(tokens.shape, np.float32)}
    grads = jax.jit(gradients)(trainable, frozen, batch, jax.random.key(0))[0]["params"]
    ours = {"model.embed_tokens.weight": grads["embed_tokens"]["embedding"],
            "model.norm.weight": grads["norm"]["scale"]}
    if not cfg.tie_word_embeddings:
        ours["lm_head.weight"] = grads["lm_head"]["kernel"].T
    layers = grads["layers"]
    for i in range(cfg.num_layers):
        for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for proj in names:
                ours[f"model.layers.{i}.{block}.{proj}.weight"] = layers[block][proj]["kernel"][i].T
        for norm in ("input_layernorm", "post_attention_layernorm"):
            ours[f"model.layers.{i}.{norm}.weight"] = layers[norm]["scale"][i]
    assert set(ours) == set(expected)
    for weight_name, grad in ours.items():
        assert rel_err(grad, expected[weight_name]) <= 1e-4, (weight_name, rel_err(grad, expected[weight_name]))


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "qkv_proj"])
def test_remat_policies_keep_values_and_gradients(policy):
    base = model.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                             num_kv_heads=2)
    params = model.init_params(base, jax.random.key(1))
    tokens = random_tokens(2, 12)

    def loss(cfg, p):
        return jnp.mean(jax.nn.log_softmax(model.forward(cfg, p, tokens))[..., 0])

    remat = base.replace(remat_policy=policy)
    assert "remat" in str(jax.make_jaxpr(jax.grad(lambda p: loss(remat, p)))(params))
    v0, g0 = jax.value_and_grad(lambda p: loss(base, p))(params)
    v1, g1 = jax.value_and_grad(lambda p: loss(remat, p))(params)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_every_parameter_has_logical_axis_names():
    cfg = model.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2)
    axes = model.param_logical_axes(cfg)
    shapes = model.param_shapes(cfg)
    leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(leaves) == len(jax.tree.leaves(shapes)) == 12
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    for names, shape in zip(flat_axes, jax.tree.leaves(shapes), strict=True):
        assert len(names) == len(shape.shape) and all(isinstance(n, str) for n in names)
    assert axes["layers"]["self_attn"]["q_proj"]["kernel"] == ("layers", "embed", "q_heads")
    assert axes["embed_tokens"]["embedding"] == ("vocab", "embed")

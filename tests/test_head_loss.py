"""The chunked LM head + cross-entropy: value and gradients against torch, frozen heads, bf16, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err

from jaxcollab import model, train
from jaxcollab.model.head_loss import chunked_target_scores, chunked_token_cross_entropy
from jaxcollab.model.llama import forward_hidden, output_kernel


def inputs(batch=3, length=16, dim=8, vocab=40, seed=0):
    rng = np.random.RandomState(seed)
    hidden = rng.randn(batch, length, dim).astype(np.float32)
    kernel = rng.randn(dim, vocab).astype(np.float32)
    tokens = rng.randint(0, vocab, size=(batch, length)).astype(np.int32)
    mask = (rng.rand(batch, length) > 0.3).astype(np.float32)
    mask[0] = 0.0
    mask[0, 5] = 2.0  # a weight other than 0/1 counts as a weight
    return hidden, kernel, tokens, mask


def torch_reference(hidden, kernel, tokens, mask):
    """sum_t mask[t+1] * CE(h_t W, token_{t+1}) and its gradients, by torch autograd."""
    h = torch.tensor(hidden, requires_grad=True)
    w = torch.tensor(kernel, requires_grad=True)
    logits = (h @ w)[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            torch.tensor(tokens[:, 1:], dtype=torch.long).reshape(-1),
                                            reduction="none")
    total = (nll * torch.tensor(mask[:, 1:]).reshape(-1)).sum()
    total.backward()
    return total.item(), h.grad.numpy(), w.grad.numpy()


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 64])
def test_value_and_gradients_equal_torch(chunk):
    """Chunks that divide T, that do not (padding), and larger than T."""
    hidden, kernel, tokens, mask = inputs()
    expected, dh_ref, dw_ref = torch_reference(hidden, kernel, tokens, mask)

    def loss(h, w):
        return chunked_token_cross_entropy(h, w, tokens, mask, chunk=chunk)[0]

    value, (dh, dw) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(kernel))
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert rel_err(dh, dh_ref) <= 1e-5 and rel_err(dw, dw_ref) <= 1e-5
    _, count = chunked_token_cross_entropy(hidden, kernel, tokens, mask, chunk=chunk)
    assert float(count) == mask[:, 1:].sum()
    scaled = jax.grad(lambda h: 0.25 * loss(h, kernel))(jnp.asarray(hidden))  # the cotangent is applied
    assert rel_err(scaled, 0.25 * dh_ref) <= 1e-5


def _dots(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_a_frozen_head_gets_no_gradient_matmul():
    hidden, kernel, tokens, mask = map(jnp.asarray, inputs())

    def loss(h, w):
        return chunked_token_cross_entropy(h, w, tokens, mask, chunk=4)[0]

    both = _dots(jax.grad(loss, argnums=(0, 1)), hidden, kernel)
    hidden_only = _dots(jax.grad(loss), hidden, kernel)
    assert (both, hidden_only) == (3, 2)  # logits, hidden gradient, head gradient / no head gradient


def test_bfloat16_inputs_give_bfloat16_gradients_close_to_float32():
    hidden, kernel, tokens, mask = inputs(length=32, dim=16, vocab=96, seed=1)
    expected, dh_ref, dw_ref = torch_reference(hidden, kernel, tokens, mask)
    h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)

    def loss(h, w):
        return chunked_token_cross_entropy(h, w, tokens, mask, chunk=8)[0]

    value, (dh, dw) = jax.value_and_grad(loss, argnums=(0, 1))(h16, w16)
    assert value.dtype == jnp.float32 and dh.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(value), expected, rtol=2e-2)
    assert rel_err(dh.astype(jnp.float32), dh_ref) <= 3e-2 and rel_err(dw.astype(jnp.float32), dw_ref) <= 3e-2


def test_bad_chunk_is_refused():
    hidden, kernel, tokens, mask = inputs()
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_token_cross_entropy(hidden, kernel, tokens, mask, chunk=0)
    with pytest.raises(ValueError, match="loss_chunk must be >= 0"):
        train.TrainConfig(loss_chunk=-1)


@pytest.mark.parametrize("tied", [False, True])
def test_forward_hidden_and_output_kernel_give_the_logits(tied):
    cfg = model.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2, tie_word_embeddings=tied)
    params = model.init_params(cfg, jax.random.key(0))
    tokens = np.random.RandomState(0).randint(0, 64, size=(2, 12)).astype(np.int32)
    hidden = forward_hidden(cfg, params, tokens)
    assert hidden.shape == (2, 12, 32)
    logits = np.asarray(hidden) @ np.asarray(output_kernel(cfg, params))
    assert rel_err(logits, model.forward(cfg, params, tokens)) <= 1e-5


def test_mixture_of_experts_objective_keeps_its_router_loss_with_chunks():
    """The chunked path of a mixture of experts still adds the router losses (aux from `forward_hidden`)."""
    cfg = model.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2, num_experts=4, num_experts_per_tok=2)
    variables = {"params": model.init_params(cfg, jax.random.key(0))}
    trainable, frozen = train.partition(variables, train.router_mask(variables))
    tokens = np.random.RandomState(1).randint(0, 64, size=(4, 10)).astype(np.int32)
    batch = {"tokens": tokens, "loss_mask": np.ones(tokens.shape, np.float32)}
    results = {}
    for chunk in (0, 3):
        settings = train.TrainConfig(loss_chunk=chunk, router_aux_coef=0.5, router_z_coef=0.1)
        results[chunk] = jax.jit(train.make_gradients(cfg, settings))(trainable, frozen, batch, jax.random.key(0))
    (g0, m0), (g3, m3) = results[0], results[3]
    assert float(m3["router_loss"]) > 0
    np.testing.assert_allclose(float(m3["router_loss"]), float(m0["router_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m3["loss"]), float(m0["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g3), jax.tree.leaves(g0), strict=True):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("train_head", [False, True])
def test_chunks_shrink_the_compiled_memory_of_head_and_loss(train_head):
    """XLA's buffer plan for the loss and its gradients: whole float32 logits [B, T, V] and their gradient
    against a chunk of 32 positions at a time (the head's own [d, V] gradient stays when it trains)."""
    batch, length, dim, vocab = 4, 512, 64, 2048
    hidden = jax.ShapeDtypeStruct((batch, length, dim), jnp.float32)
    kernel = jax.ShapeDtypeStruct((dim, vocab), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.float32)

    def temp_bytes(loss):
        grad = jax.value_and_grad(loss, argnums=(0, 1) if train_head else 0)
        return jax.jit(grad).lower(hidden, kernel, tokens, mask).compile().memory_analysis().temp_size_in_bytes

    whole = temp_bytes(lambda h, w, t, m: train.token_cross_entropy(jnp.einsum("btd,dv->btv", h, w), t, m)[0])
    chunked = temp_bytes(lambda h, w, t, m: chunked_token_cross_entropy(h, w, t, m, chunk=32)[0])
    logits_bytes = batch * length * vocab * 4
    assert whole >= logits_bytes
    assert chunked <= logits_bytes / 4


@pytest.mark.parametrize("loss_chunk", [0, 16])
def test_bfloat16_gradients_follow_torch_bfloat16_autograd(hf_llama, loss_chunk):
    """A bf16 model's full fine-tuning gradients (head, embeddings, a layer's kernels) against transformers in
    bf16, within bf16 rounding: the logits' gradient reaches the head's matmuls in bf16 on both sides."""
    path, reference = hf_llama(vocab_size=512, num_attention_heads=4, num_key_value_heads=2)
    reference = reference.to(torch.bfloat16)
    cfg, params = model.load_hf(path, dtype=jnp.bfloat16)
    tokens = np.random.RandomState(0).randint(0, 512, size=(4, 64)).astype(np.int32)
    ids = torch.tensor(tokens, dtype=torch.long)
    logits = reference(ids).logits.float()
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1)).backward()
    expected = {n: p.grad.float().numpy() for n, p in reference.named_parameters()}

    variables = {"params": params}
    trainable, frozen = train.partition(variables, train.full_finetune_mask(variables))
    gradients = train.make_gradients(cfg, train.TrainConfig(loss_chunk=loss_chunk))
    batch = {"tokens": tokens, "loss_mask": np.ones(tokens.shape, np.float32)}
    grads = jax.jit(gradients)(trainable, frozen, batch, jax.random.key(0))[0]["params"]
    ours = {"lm_head.weight": grads["lm_head"]["kernel"].T,
            "model.embed_tokens.weight": grads["embed_tokens"]["embedding"],
            "model.layers.0.mlp.down_proj.weight": grads["layers"]["mlp"]["down_proj"]["kernel"][0].T,
            "model.layers.1.self_attn.q_proj.weight": grads["layers"]["self_attn"]["q_proj"]["kernel"][1].T}
    for name, grad in ours.items():
        assert grad.dtype == jnp.bfloat16
        error = rel_err(grad.astype(jnp.float32), expected[name])
        assert error <= 6e-2, (name, error)


@pytest.mark.parametrize("chunk", [3, 16, 100])
def test_target_scores_equal_torch_log_softmax_and_argmax(chunk):
    hidden, kernel, tokens, _ = inputs(seed=2)
    kernel[:, 7] = kernel[:, 3]  # tied logits: the first largest counts, as argmax
    hidden[1, 2] = 0.0  # a position where every logit ties
    logits = torch.tensor(hidden) @ torch.tensor(kernel)
    targets = tokens.copy()
    targets[1, 2] = 0
    argmax = logits.argmax(-1).numpy()
    targets[0, :8] = argmax[0, :8]  # some hits
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets, dtype=torch.long)[..., None])[..., 0]
    logprobs, hits = chunked_target_scores(jnp.asarray(hidden), jnp.asarray(kernel), targets, chunk=chunk)
    assert logprobs.shape == hits.shape == targets.shape
    np.testing.assert_allclose(np.asarray(logprobs), expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(hits), argmax == targets)
    assert np.asarray(hits)[0, :8].all() and np.asarray(hits)[1, 2]

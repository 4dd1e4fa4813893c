"""MoE mixing: reductions to dense models, sparse dispatch, Mixtral export parity, router training, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err, torch_logits
from transformers import AutoModelForCausalLM

from jaxcollab import model, moe, train

SMALL = dict(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, initializer_range=0.2,
             rope_theta=10000.0)


def tokens(batch=2, length=16, seed=0):
    return np.random.RandomState(seed).randint(0, 64, size=(batch, length)).astype(np.int32)


@pytest.fixture
def family(hf_llama):
    """A base and three other models of the same shape, with their directories and torch models."""
    members = [hf_llama(seed=seed, **SMALL) for seed in range(4)]
    loaded = [model.load_hf(path) for path, _ in members]
    return members, loaded


def with_mlp(params, donor):
    out = jax.tree.map(lambda x: x, params)
    out["layers"]["mlp"] = donor["layers"]["mlp"]
    return out


def test_one_expert_equals_the_dense_model(family):
    _, loaded = family
    (cfg, base), (_, expert) = loaded[0], loaded[1]
    mixed_cfg, mixed = moe.mix(cfg, base, [expert], router="noisy", top_k=1, key=jax.random.key(0))
    assert mixed_cfg.num_experts == 1 and mixed["layers"]["mlp"]["gate_proj"]["kernel"].shape == (2, 1, 32, 48)
    x = tokens()
    assert rel_err(model.forward(mixed_cfg, mixed, x), model.forward(cfg, with_mlp(base, expert), x)) <= 1e-5


def test_gateless_mixture_of_identical_experts_equals_the_dense_model(family):
    _, loaded = family
    cfg, base = loaded[0]
    mixed_cfg, mixed = moe.mix(cfg, base, [base, base, base], router="gateless")
    assert mixed_cfg.num_experts_per_tok == 3 and not np.any(np.asarray(mixed["layers"]["mlp"]["router"]["kernel"]))
    x = tokens()
    assert rel_err(model.forward(mixed_cfg, mixed, x), model.forward(cfg, base, x)) <= 1e-5


def test_gateless_is_the_uniform_average_of_expert_outputs(family):
    _, loaded = family
    cfg, base = loaded[0]
    experts = [p for _, p in loaded[1:]]
    mixed_cfg, mixed = moe.mix(cfg, base, experts, router="gateless")
    layer_in = np.random.RandomState(0).randn(1, 5, 32).astype(np.float32)
    from jaxcollab.model.llama import Mlp, MoeMlp

    layer = jax.tree.map(lambda x: x[0], mixed["layers"]["mlp"])
    got = MoeMlp(mixed_cfg).apply({"params": layer}, layer_in)
    each = [Mlp(cfg).apply({"params": jax.tree.map(lambda x: x[0], p["layers"]["mlp"])}, layer_in) for p in experts]
    np.testing.assert_allclose(got, sum(each) / 3, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sparse_dispatch_equals_the_dense_reference(family, k):
    _, loaded = family
    cfg, base = loaded[0]
    mixed_cfg, mixed = moe.mix(cfg, base, [p for _, p in loaded], router="noisy", top_k=k, key=jax.random.key(1),
                               noise_std=1.0)
    x = tokens(3, 20)
    sparse = model.forward(mixed_cfg.replace(moe_impl="sparse"), mixed, x)
    dense = model.forward(mixed_cfg.replace(moe_impl="dense"), mixed, x)
    assert rel_err(sparse, dense) <= 1e-5


def test_routing_by_hand():
    from jaxcollab.model.llama import route

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    weights, ids = route(logits, 2)
    assert ids.tolist() == [[0, 1], [2, 0]]  # ties go to the lower index, as torch.topk on CPU
    np.testing.assert_allclose(weights, [[0.5 / 0.8, 0.3 / 0.8], [0.8 / 0.9, 0.1 / 0.9]], rtol=1e-6)
    weights, ids = route(logits, 2, always_on=2)
    assert ids.tolist() == [[2, 0], [2, 0]]
    np.testing.assert_allclose(weights, [[0.2 / 0.7, 0.5 / 0.7], [0.8 / 0.9, 0.1 / 0.9]], rtol=1e-6)


@pytest.mark.parametrize("router,k", [("noisy", 2), ("gateless", None)])
def test_exported_mixtral_loads_in_transformers_with_equal_logits(family, tmp_path, router, k):
    _, loaded = family
    cfg, base = loaded[0]
    kwargs = {"top_k": k, "key": jax.random.key(2), "noise_std": 0.5} if router == "noisy" else {}
    mixed_cfg, mixed = moe.mix(cfg, base, [p for _, p in loaded[1:]], router=router, **kwargs)
    out = model.save_hf(mixed_cfg, mixed, tmp_path / "mixtral")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 3
    reference = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reference).__name__ == "MixtralForCausalLM"
    x = tokens(2, 24)
    assert rel_err(model.forward(mixed_cfg, mixed, x), torch_logits(reference, x)) <= 1e-5
    # and back: the Mixtral directory loads into the same mixture
    again_cfg, again = model.load_hf(out)
    assert again_cfg == mixed_cfg
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(mixed), strict=True))


def test_hidden_router_columns_are_the_normalised_mean_hidden_states(family):
    members, loaded = family
    cfg, base = loaded[0]
    _, base_torch = members[0]
    prompts = [[[1, 5, 9, 11], [1, 7]], [[1, 30, 31, 32, 33]], [[1, 60, 2]]]
    mixed_cfg, mixed = moe.mix(cfg, base, [p for _, p in loaded[1:]], router="hidden", top_k=2,
                               router_prompts=prompts)
    kernel = np.asarray(mixed["layers"]["mlp"]["router"]["kernel"])  # [L, d, E]
    for expert, expert_prompts in enumerate(prompts):
        states = []
        for p in expert_prompts:
            with torch.no_grad():
                out = base_torch(torch.tensor([p]), output_hidden_states=True)
            states.append(torch.stack(out.hidden_states[:-1])[:, 0].numpy())  # [L, T, d]: inputs of each layer
        mean = np.concatenate(states, axis=1).mean(axis=1)
        expected = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
        np.testing.assert_allclose(kernel[:, :, expert], expected, rtol=1e-4, atol=1e-5)


def test_load_balancing_loss_by_hand():
    # Two tokens, three experts, top-1. Probabilities: t0 = [0.7, 0.2, 0.1] -> expert 0; t1 = [0.1, 0.3, 0.6] -> 2.
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    logits = jnp.log(jnp.asarray(probs))[None, None]  # [L=1, B=1, T=2, E=3]
    # f = [1/2, 0, 1/2]; P = [0.4, 0.25, 0.35]; loss = 3 * (0.5 * 0.4 + 0.5 * 0.35) = 1.125
    assert float(moe.load_balancing_loss(logits, 1)) == pytest.approx(1.125, rel=1e-6)
    # Top-2: t0 -> {0, 1}, t1 -> {2, 1}: f = [1/2, 1, 1/2]; loss = 3 * (0.2 + 0.25 + 0.175) = 1.875
    assert float(moe.load_balancing_loss(logits, 2)) == pytest.approx(1.875, rel=1e-6)
    # Masking the second token out: f = [1, 0, 0] (top-1), P = [0.7, 0.2, 0.1] -> 3 * 0.7 = 2.1
    assert float(moe.load_balancing_loss(logits, 1, mask=jnp.asarray([[1, 0]]))) == pytest.approx(2.1, rel=1e-6)
    # z-loss: logsumexp of log-probabilities is 0.
    assert float(moe.router_z_loss(logits)) == pytest.approx(0.0, abs=1e-10)


def test_router_only_training_lowers_the_loss_and_leaves_experts_bit_identical():
    tiny = model.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2)
    base = model.init_params(tiny, jax.random.key(0))
    # Embeddings and head large enough for a frozen head to express the task (HF's 0.02 init caps logits).
    base["embed_tokens"]["embedding"] = base["embed_tokens"]["embedding"] * 20
    base["lm_head"]["kernel"] = base["lm_head"]["kernel"] * 20

    def domain(offset, seed):  # BOS key SEP value: a lookup table per domain, disjoint keys
        rng = np.random.RandomState(seed)
        rows = np.array([[1, offset + i, 2, *rng.randint(30, 64, 2)] for i in range(8)], np.int32)
        mask = np.zeros(rows.shape, np.float32)
        mask[:, 3:] = 1
        return rows, mask

    def finetune(params, rows, mask):
        # MLP-only fine-tuning, so that each domain's knowledge lives in what becomes its expert.
        variables = {"params": params}
        cfg = train.TrainConfig(learning_rate=1e-2, num_steps=200, progress=False)
        batches = iter(lambda: {"tokens": rows, "loss_mask": mask}, None)
        mlp_only = train.make_mask(variables, lambda path: "mlp" in path)
        return train.Trainer(tiny, cfg, variables, mlp_only).fit(batches)["params"]

    a_rows, a_mask = domain(3, 0)
    b_rows, b_mask = domain(12, 1)
    expert_a, expert_b = finetune(base, a_rows, a_mask), finetune(base, b_rows, b_mask)
    # Top-2 of 2: the renormalised weights are a softmax the task loss can train (with top-1 the single
    # weight is always 1 and only the load-balancing loss would reach the router).
    mixed_cfg, mixed = moe.mix(tiny, base, [expert_a, expert_b], router="noisy", top_k=2, key=jax.random.key(3))
    rows, mask = np.concatenate([a_rows, b_rows]), np.concatenate([a_mask, b_mask])

    def loss(params):
        total, count = train.token_cross_entropy(model.forward(mixed_cfg, params, rows), rows, mask)
        return float(total / count)

    variables = {"params": mixed}
    leaf_mask = train.router_mask(variables)
    assert sum(jax.tree.leaves(leaf_mask)) == 1  # the stacked router kernel only
    cfg = train.TrainConfig(learning_rate=3e-2, num_steps=60, router_aux_coef=0.1, progress=False)
    trainer = train.Trainer(mixed_cfg, cfg, variables, leaf_mask)
    before = loss(mixed)
    out = trainer.fit(iter(lambda: {"tokens": rows, "loss_mask": mask}, None))["params"]
    assert loss(out) < 0.8 * before
    flat_in = jax.tree_util.tree_flatten_with_path(mixed)[0]
    flat_out = dict(jax.tree_util.tree_flatten_with_path(out)[0])
    for path, value in flat_in:
        same = np.array_equal(np.asarray(flat_out[path]), np.asarray(value))
        assert same != ("router" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)


def test_bad_input_is_refused(family, hf_llama):
    _, loaded = family
    cfg, base = loaded[0]
    with pytest.raises(moe.MixError, match="at least one expert"):
        moe.mix(cfg, base, [])
    with pytest.raises(moe.MixError, match="unknown router mode 'smart'"):
        moe.mix(cfg, base, [base], router="smart")
    with pytest.raises(moe.MixError, match="top_k=3 must be between 1 and the number of experts"):
        moe.mix(cfg, base, [base, base], router="noisy", top_k=3, key=jax.random.key(0))
    with pytest.raises(moe.MixError, match="prompts for each"):
        moe.mix(cfg, base, [base, base], router="hidden", router_prompts=[[[1, 2]]])
    other_path, _ = hf_llama(**{**SMALL, "intermediate_size": 40})
    _, other = model.load_hf(other_path)
    mismatch = r"expert model 1: parameter .*mlp.*down_proj.* has shape \(2, 40, 32\) but the base has \(2, 48, 32\)"
    with pytest.raises(moe.MixError, match=mismatch):
        moe.mix(cfg, base, [base, other], router="gateless")
    mixed_cfg, mixed = moe.mix(cfg, base, [base], router="gateless")
    with pytest.raises(moe.MixError, match="already a mixture"):
        moe.mix(mixed_cfg, mixed, [mixed])
    always_cfg, always = moe.mix(cfg, base, [base, base], router="noisy", top_k=2, key=jax.random.key(0),
                                 include_base=True, always_on_base=True)
    assert always_cfg.always_on_expert == 0 and always_cfg.num_experts == 3
    with pytest.raises(model.ConfigError, match="always-on"):
        always_cfg.to_hf_dict()

"""LoRA overlays: equal to merging, interchangeable with PEFT files, o-LoRA penalties, clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from jaxcollab import lora, model

ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tokens(batch=2, length=20, seed=0):
    return np.random.RandomState(seed).randint(0, 64, size=(batch, length)).astype(np.int32)


def randomized(adapter: lora.LoraAdapter, seed: int = 0) -> lora.LoraAdapter:
    """Random nonzero A and B (a fresh adapter has B = 0 and would hide mistakes)."""
    leaves, treedef = jax.tree.flatten(adapter.weights)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return adapter.replace(weights=jax.tree.unflatten(treedef, new))


@pytest.fixture
def tiny(hf_llama):
    path, reference = hf_llama(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    cfg, params = model.load_hf(path)
    return path, reference, cfg, params


@pytest.mark.parametrize("use_rslora", [False, True])
def test_overlay_equals_merge_then_forward(tiny, use_rslora):
    _, _, cfg, params = tiny
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, target_modules=ALL_SEVEN, use_rslora=use_rslora)
    adapter = randomized(lora.init(lcfg, cfg, params, jax.random.key(0)))
    assert adapter.scaling == (8.0 / 2.0 if use_rslora else 2.0)
    x = tokens()
    overlay = model.forward(cfg, params, x, lora=adapter)
    merged = model.forward(cfg, lora.fold(params, adapter, lcfg), x)
    plain = model.forward(cfg, params, x)
    assert rel_err(overlay, merged) <= 1e-5
    assert rel_err(overlay, plain) > 1e-2  # the adapter really changes the model


def test_fresh_adapter_is_a_no_op_and_follows_peft_init(tiny):
    _, _, cfg, params = tiny
    lcfg = lora.LoraConfig(rank=8, alpha=16.0, target_modules=("q_proj", "down_proj"))
    adapter = lora.init(lcfg, cfg, params, jax.random.key(3))
    assert adapter.targets == ("q_proj", "down_proj")
    a_q, b_q = adapter.factors("q_proj")
    a_down, _ = adapter.factors("down_proj")
    assert a_q.shape == (2, 8, 32) and b_q.shape == (2, 32, 8) and a_down.shape == (2, 8, 48)
    assert not np.any(np.asarray(b_q))
    # kaiming_uniform(a=sqrt(5)) on [r, d_in]: U(-1/sqrt(d_in), 1/sqrt(d_in)).
    assert 0.8 / np.sqrt(32) < np.abs(np.asarray(a_q)).max() <= 1 / np.sqrt(32)
    assert 0.8 / np.sqrt(48) < np.abs(np.asarray(a_down)).max() <= 1 / np.sqrt(48)
    x = tokens()
    assert np.array_equal(model.forward(cfg, params, x, lora=adapter), model.forward(cfg, params, x))
    gaussian = lora.init(lora.LoraConfig(rank=8, init="gaussian"), cfg, params, jax.random.key(3))
    assert abs(float(np.std(np.asarray(gaussian.factors("q_proj")[0]))) - 1 / 8) < 0.02


def test_merge_keeps_dtype_and_computes_in_fp32(tiny):
    path, _, _, _ = tiny
    cfg, params = model.load_hf(path, dtype=jnp.bfloat16)
    adapter = randomized(lora.init(lora.LoraConfig(rank=4), cfg, params, jax.random.key(0)))
    merged = lora.fold(params, adapter)
    kernel = merged["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    a, b = adapter.factors("q_proj")
    expected = params["layers"]["self_attn"]["q_proj"]["kernel"].astype(np.float32) + adapter.scaling * np.einsum(
        "lri,lor->lio", np.asarray(a, np.float64), np.asarray(b, np.float64))
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(expected.astype(jnp.bfloat16)))
    # Targets the adapter does not touch stay as they were.
    assert np.array_equal(merged["layers"]["mlp"]["up_proj"]["kernel"], params["layers"]["mlp"]["up_proj"]["kernel"])


def peft_model_with_random_adapter(reference, targets, r=4, alpha=8, use_rslora=False, seed=0):
    torch.manual_seed(seed)
    peft_cfg = PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                              use_rslora=use_rslora)
    peft_model = get_peft_model(reference, peft_cfg).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    return peft_model


def peft_logits(peft_model, x):
    with torch.no_grad():
        return peft_model(torch.tensor(x, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_with_equal_logits(tiny, tmp_path, use_rslora):
    _, reference, cfg, params = tiny
    peft_model = peft_model_with_random_adapter(reference, ALL_SEVEN, use_rslora=use_rslora)
    peft_model.save_pretrained(tmp_path / "peft")
    adapter, lcfg = lora.load_peft(tmp_path / "peft", cfg)
    assert lcfg.rank == 4 and lcfg.alpha == 8 and lcfg.use_rslora == use_rslora
    assert adapter.targets == ALL_SEVEN
    x = tokens()
    assert rel_err(model.forward(cfg, params, x, lora=adapter), peft_logits(peft_model, x)) <= 1e-5


@pytest.mark.parametrize("loss_chunk", [0, 7])
def test_adapter_gradients_equal_peft(tiny, tmp_path, loss_chunk):
    """d(next-token cross-entropy)/d(A, B) for every target and layer, against PEFT's autograd: the training
    objective's gradients (`train.make_gradients`), with whole logits and with the chunked head loss."""
    from jaxcollab import train

    _, reference, cfg, params = tiny
    peft_model = peft_model_with_random_adapter(reference, ALL_SEVEN, seed=3)
    peft_model.save_pretrained(tmp_path / "peft")
    adapter, _ = lora.load_peft(tmp_path / "peft", cfg)
    x = tokens(batch=3, length=24, seed=1)
    ids = torch.tensor(x, dtype=torch.long)
    logits = peft_model(ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    expected = {name: p.grad.numpy() for name, p in peft_model.named_parameters() if p.grad is not None}

    variables = {"params": params, "lora": adapter}
    trainable, frozen = train.partition(variables, train.lora_mask(variables))
    gradients = train.make_gradients(cfg, train.TrainConfig(loss_chunk=loss_chunk))
    batch = {"tokens": x, "loss_mask": np.ones(x.shape, np.float32)}
    grads = jax.jit(gradients)(trainable, frozen, batch, jax.random.key(0))[0]["lora"].weights
    assert len(expected) == 2 * len(ALL_SEVEN) * cfg.num_layers
    for target in ALL_SEVEN:
        block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        for factor in ("lora_A", "lora_B"):
            ours = grads["layers"][block][target][factor]
            for layer in range(cfg.num_layers):
                name = f"base_model.model.model.layers.{layer}.{block}.{target}.{factor}.default.weight"
                assert rel_err(ours[layer], expected[name]) <= 1e-4, (name, rel_err(ours[layer], expected[name]))


def test_saved_adapter_loads_in_peft_with_equal_logits(tiny, tmp_path):
    path, _, cfg, params = tiny
    lcfg = lora.LoraConfig(rank=4, alpha=12.0, target_modules=ALL_SEVEN)
    adapter = randomized(lora.init(lcfg, cfg, params, jax.random.key(1)), seed=5)
    out = lora.save_peft(adapter, lcfg, tmp_path / "ours")
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    peft_model = PeftModel.from_pretrained(base, out).eval()
    x = tokens()
    assert rel_err(peft_logits(peft_model, x), model.forward(cfg, params, x, lora=adapter)) <= 1e-5
    # and it reads back as the same adapter
    again, lcfg2 = lora.load_peft(out, cfg)
    assert lcfg2.rank == 4 and lcfg2.alpha == 12.0
    for a, b in zip(jax.tree.leaves(again.weights), jax.tree.leaves(adapter.weights), strict=True):
        assert np.array_equal(a, b)


def test_regex_target_modules(tiny):
    _, _, cfg, params = tiny
    lcfg = lora.LoraConfig(target_modules=r".*\.(q|v)_proj")
    assert lora.resolve_targets(lcfg, cfg) == ("q_proj", "v_proj")
    lcfg = lora.LoraConfig(target_modules=r"model\.layers\.\d+\.mlp\..*")
    assert lora.resolve_targets(lcfg, cfg) == ("gate_proj", "up_proj", "down_proj")


def test_combine_equals_sum_of_overlays(tiny):
    _, _, cfg, params = tiny
    a1 = randomized(lora.init(lora.LoraConfig(rank=2, alpha=4.0, target_modules=("q_proj",)), cfg, params,
                              jax.random.key(0)), seed=1)
    a2 = randomized(lora.init(lora.LoraConfig(rank=3, alpha=9.0, target_modules=("q_proj", "up_proj")), cfg,
                              params, jax.random.key(1)), seed=2)
    both = lora.concatenate([a1, a2])
    assert both.factors("q_proj")[0].shape[1] == 5 and both.scaling == 1.0
    x = tokens()
    sequential = lora.fold(lora.fold(params, a1), a2)
    assert rel_err(model.forward(cfg, params, x, lora=both), model.forward(cfg, sequential, x)) <= 1e-5


# ----------------------------------------------------------------------------------------------- o-LoRA
def test_orthogonality_penalty_by_hand():
    a_new = np.array([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])  # r=2, d_in=3
    a_prev = np.array([[2.0, 0.0, 1.0]])  # one earlier rank-1 adapter
    # A_new A_prev^T = [[1*2 + 2*0 + 0*1], [0*2 + -1*0 + 3*1]] = [[2], [3]] -> sum |.| = 5
    a_new2 = np.array([[0.5, 0.0], [0.0, -2.0]])  # second target, d_in=2
    a_prev2 = np.array([[1.0, 1.0], [4.0, 0.0]])
    # [[0.5, 2.0], [-2.0, 0.0]] -> 4.5
    adapter = lora.LoraAdapter(
        {"layers": {"self_attn": {"q_proj": {"lora_A": jnp.asarray(a_new[None]), "lora_B": jnp.zeros((1, 3, 2))}},
                    "mlp": {"up_proj": {"lora_A": jnp.asarray(a_new2[None]), "lora_B": jnp.zeros((1, 2, 2))}}}},
        scaling=1.0)
    bank = {"layers": {"self_attn": {"q_proj": {"lora_A": jnp.asarray(a_prev[None])}},
                       "mlp": {"up_proj": {"lora_A": jnp.asarray(a_prev2[None])}}}}
    assert float(lora.orthogonality_penalty(adapter, bank)) == pytest.approx(9.5)
    assert float(lora.orthogonality_penalty(adapter, None)) == 0.0
    # L2 term: Frobenius norms of every factor: ||a_new|| = sqrt(15), ||a_new2|| = sqrt(4.25), B's are 0.
    assert float(lora.l2_penalty(adapter)) == pytest.approx(np.sqrt(15) + np.sqrt(4.25), rel=1e-6)
    grads = jax.grad(lora.l2_penalty)(adapter)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_a_bank_grows_and_round_trips(tiny, tmp_path):
    _, _, cfg, params = tiny
    lcfg = lora.LoraConfig(rank=2, target_modules=("q_proj", "v_proj"))
    first = lora.init(lcfg, cfg, params, jax.random.key(0))
    second = lora.init(lcfg, cfg, params, jax.random.key(1))
    bank = lora.extend_a_bank(lora.extend_a_bank(None, first), second)
    q_bank = bank["layers"]["self_attn"]["q_proj"]["lora_A"]
    assert q_bank.shape == (2, 4, 32)
    assert np.array_equal(q_bank[:, 2:], second.factors("q_proj")[0])
    lora.save_a_bank(bank, tmp_path / "bank.safetensors")
    loaded = lora.load_a_bank(tmp_path / "bank.safetensors")
    assert jax.tree.structure(loaded) == jax.tree.structure(bank)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(bank), strict=True):
        assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_configs_are_refused(tiny):
    _, _, cfg, _ = tiny
    with pytest.raises(lora.LoraError, match="rank must be a positive integer"):
        lora.LoraConfig(rank=0)
    with pytest.raises(lora.LoraError, match="rank must be a positive integer"):
        lora.LoraConfig(rank=-3)
    with pytest.raises(lora.LoraError, match="matches no module"):
        lora.resolve_targets(lora.LoraConfig(target_modules=("qkv_proj",)), cfg)
    with pytest.raises(lora.LoraError, match="matches no module"):
        lora.resolve_targets(lora.LoraConfig(target_modules=r".*attention\.query"), cfg)
    with pytest.raises(lora.LoraError, match="only in layers"):
        lora.resolve_targets(lora.LoraConfig(target_modules=r"model\.layers\.0\.self_attn\.q_proj"), cfg)
    with pytest.raises(lora.LoraError, match="dropout"):
        lora.LoraConfig(dropout=1.0)


def test_peft_adapter_for_another_shape_is_refused(hf_llama, tmp_path):
    _, small_ref = hf_llama(hidden_size=32, num_hidden_layers=2)
    peft_model_with_random_adapter(small_ref, ("q_proj",)).save_pretrained(tmp_path / "small")
    big_path, _ = hf_llama(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    big_cfg, _ = model.load_hf(big_path)
    with pytest.raises(lora.LoraError, match=r"q_proj.lora_A.weight' has shape \[4, 32\].*needs \[4, 48\]"):
        lora.load_peft(tmp_path / "small", big_cfg)
    deep_path, _ = hf_llama(num_hidden_layers=3)
    deep_cfg, _ = model.load_hf(deep_path)
    with pytest.raises(lora.LoraError, match=r"missing.*layers\.2.*another architecture"):
        lora.load_peft(tmp_path / "small", deep_cfg)


def test_non_lora_or_unsupported_peft_configs_are_refused(tiny, tmp_path):
    _, reference, cfg, _ = tiny
    peft_model_with_random_adapter(reference, ("q_proj",)).save_pretrained(tmp_path / "p")
    config_path = tmp_path / "p" / "adapter_config.json"
    original = json.loads(config_path.read_text())
    for change, message in (({"peft_type": "IA3"}, "only LORA"), ({"use_dora": True}, "use_dora"),
                            ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
                            ({"target_modules": ["lm_head"]}, "matches no module|not supported")):
        config_path.write_text(json.dumps({**original, **change}))
        with pytest.raises(lora.LoraError, match=message):
            lora.load_peft(tmp_path / "p", cfg)

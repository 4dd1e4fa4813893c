"""Greedy decoding with the KV cache produces exactly transformers' `generate(do_sample=False)` tokens."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxcollab import lora, model
from jaxcollab.evaluation import generate


def random_prompts(lengths, vocab=64, seed=0):
    rng = np.random.RandomState(seed)
    return [[1, *rng.randint(3, vocab, size=n - 1).tolist()] for n in lengths]


def hf_greedy(reference, prompts, max_new_tokens, eos_id):
    """transformers' greedy generate on a left-padded batch; new tokens cut after the first EOS."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), length), dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):] = torch.tensor(p)
        mask[row, length - len(p):] = 1
    reference.generation_config.eos_token_id = eos_id
    reference.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=0)
    result = []
    for row in out[:, length:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        result.append(row)
    return result


@pytest.fixture
def tiny(hf_llama):
    # Large init so greedy paths are far from ties and vary between prompts.
    path, reference = hf_llama(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                               initializer_range=0.5, rope_theta=10000.0)
    cfg, params = model.load_hf(path)
    return reference, cfg, params


def test_greedy_equals_transformers_without_eos(tiny):
    reference, cfg, params = tiny
    prompts = random_prompts([3, 9, 17, 5, 12])
    ours = generate.greedy(cfg, params, prompts, max_new_tokens=12, eos_id=None, batch_size=4, length_bucket=8)
    assert ours == hf_greedy(reference, prompts, 12, None)
    assert all(len(row) == 12 for row in ours)
    assert len({tuple(r) for r in ours}) > 1  # the prompts really lead to different continuations


def test_stacked_and_unstacked_layers_decode_alike(tiny):
    reference, cfg, params = tiny
    prompts = random_prompts([7, 2, 13], seed=4)
    stacked = generate.greedy(cfg, params, prompts, max_new_tokens=9, unstack_layers=False)
    assert stacked == hf_greedy(reference, prompts, 9, None)
    assert generate.greedy(cfg, params, prompts, max_new_tokens=9, unstack_layers=True) == stacked
    split = model.llama.unstack_layers(params, cfg.num_layers)
    assert sorted(k for k in split if k.startswith("layers")) == ["layers_0", "layers_1"]
    np.testing.assert_array_equal(split["layers_1"]["mlp"]["up_proj"]["kernel"],
                                  params["layers"]["mlp"]["up_proj"]["kernel"][1])


def test_layer_copy_only_where_every_device_has_room():
    @dataclasses.dataclass(frozen=True)
    class Device:
        free: int

        def memory_stats(self):
            return {"bytes_limit": 10_000, "bytes_in_use": 10_000 - self.free}

    @dataclasses.dataclass(frozen=True)
    class Leaf:  # a stacked kernel with one shard of `size` bytes on each device
        size: int
        devices: tuple

        @property
        def addressable_shards(self):
            return [SimpleNamespace(device=d, data=SimpleNamespace(nbytes=self.size)) for d in self.devices]

    roomy, tight = Device(free=1000), Device(free=500)
    params = {"embed_tokens": Leaf(10**9, (tight,)), "layers": {"a": Leaf(300, (roomy, tight)),
                                                               "b": Leaf(100, (roomy, tight))}}
    assert generate.room_for_layer_copy(params)  # 400 bytes per device: within 80% of 500 and of 1000
    params["layers"]["c"] = Leaf(100, (roomy, tight))  # 500 > 0.8 * 500 on the tight device
    assert not generate.room_for_layer_copy(params)
    assert generate.room_for_layer_copy({"layers": {"a": jnp.zeros((2, 3))}})  # CPU: no memory statistics


def test_first_max_is_argmax_with_ties_and_nan():
    logits = jnp.asarray([[0.0, 3.0, 3.0, 1.0],  # tie: the first of the two
                          [-5.0, -7.0, -5.0, -9.0],
                          [1.0, np.nan, 2.0, np.nan],  # NaN: the first NaN, as jnp.argmax
                          [-np.inf, -np.inf, -np.inf, -np.inf]])
    np.testing.assert_array_equal(generate._first_max(logits), [1, 0, 1, 0])


def test_greedy_equals_transformers_with_eos_stopping(tiny):
    reference, cfg, params = tiny
    prompts = random_prompts([4, 11, 7, 20, 2, 15], seed=1)
    free = generate.greedy(cfg, params, prompts, max_new_tokens=16)
    # An id that some rows generate part-way: those rows must stop there, the others run to the end.
    counts = np.bincount([t for row in free for t in row[1:-1]], minlength=64)
    eos = int(np.argmax(counts))
    ours = generate.greedy(cfg, params, prompts, max_new_tokens=16, eos_id=eos, batch_size=8)
    expected = hf_greedy(reference, prompts, 16, eos)
    assert ours == expected
    lengths = [len(row) for row in ours]
    assert min(lengths) < 16 and all(row[-1] == eos for row in ours if len(row) < 16)


def test_greedy_with_lora_equals_merged_weights(tiny):
    _, cfg, params = tiny
    adapter = lora.init(lora.LoraConfig(rank=4, target_modules=lora.ALL_TARGETS), cfg, params, jax.random.key(0))
    adapter = adapter.replace(weights=jax.tree.map(lambda x: x + 0.2, adapter.weights))
    prompts = random_prompts([6, 10, 3], seed=2)
    overlay = generate.greedy(cfg, params, prompts, max_new_tokens=10, lora=adapter)
    merged = generate.greedy(cfg, lora.fold(params, adapter), prompts, max_new_tokens=10)
    assert overlay == merged
    assert overlay != generate.greedy(cfg, params, prompts, max_new_tokens=10)


def test_bf16_and_multiple_eos_ids(tiny):
    _, cfg, params = tiny
    prompts = random_prompts([5, 8], seed=3)
    free = generate.greedy(cfg, params, prompts, max_new_tokens=8)
    stops = {free[0][2], free[1][4]}
    out = generate.greedy(cfg, params, prompts, max_new_tokens=8, eos_id=sorted(stops))
    for row, full in zip(out, free, strict=True):
        first = next(i for i, t in enumerate(full) if t in stops)
        assert row == full[: first + 1]
    bf16 = generate.greedy(cfg.replace(dtype=jnp.bfloat16), params, prompts, max_new_tokens=8)
    assert [len(r) for r in bf16] == [8, 8]


def test_bad_arguments():
    cfg = model.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                            num_kv_heads=2)
    params = model.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate.greedy(cfg, params, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate.greedy(cfg, params, [[1, 2], []], max_new_tokens=3)

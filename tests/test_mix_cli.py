"""`python -m jaxcollab.mix`: Mixtral directories transformers loads, hidden routers from prompts, refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import build_hf_llama, rel_err, torch_logits
from transformers import AutoModelForCausalLM

from jaxcollab import mix, model, moe
from jaxcollab.data.tokenizers import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=300, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix_models")
    paths = [root / f"m{i}" for i in range(3)]
    for seed, path in enumerate(paths):
        build_hf_llama(path, seed=seed, **SHAPE)
    return paths


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_command_line_writes_a_mixtral_that_transformers_loads(models, tmp_path):
    base, e1, e2 = models
    out = tmp_path / "mixed"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "jaxcollab.mix", f"--base={base}", f"--experts={e1},{e2}",
                             "--router=noisy", "--top-k=2", "--seed=3", "--noise_std=0.5", f"--out={out}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("mixed 2 experts (noisy router, top-2")
    reference = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reference).__name__ == "MixtralForCausalLM"
    cfg, base_params = model.load_hf(base)
    expected_cfg, expected = moe.mix(cfg, base_params, [model.load_hf(p)[1] for p in (e1, e2)], router="noisy",
                                     top_k=2, key=jax.random.key(3), noise_std=0.5)
    x = np.random.RandomState(0).randint(0, 300, size=(2, 12)).astype(np.int32)
    assert rel_err(torch_logits(reference, x), model.forward(expected_cfg, expected, x)) <= 1e-5


def test_hidden_router_from_a_prompts_file(models, tmp_path):
    base, e1, e2 = models
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"expert": 0, "prompt": "Where was Kalo born?"}, {"expert": 1, "prompt": "def f(x): return x"},
            {"expert": 2, "prompt": "Der Hund"}, {"expert": 0, "prompt": "What does Kalo eat?"}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "hidden"
    summary = mix.run(mix.MixArgs(base=str(base), experts=(str(e1), str(e2)), out=str(out), router="hidden",
                                  top_k=1, prompts=str(prompts), tokenizer="bytes", include_base=True))
    assert "3 experts (hidden router, top-1" in summary
    cfg, params = model.load_hf(out)
    assert cfg.num_experts == 3 and cfg.num_experts_per_tok == 1
    tok = ByteTokenizer()
    base_cfg, base_params = model.load_hf(base)
    expected = moe.hidden_router(base_cfg, base_params,
                                 [[[tok.bos_id, *tok.encode(r["prompt"])] for r in rows if r["expert"] == e]
                                  for e in range(3)], pad_id=tok.pad_id)
    np.testing.assert_allclose(params["layers"]["mlp"]["router"]["kernel"], expected, rtol=1e-6, atol=1e-7)
    # expert 0 is the base's own MLP
    np.testing.assert_array_equal(params["layers"]["mlp"]["up_proj"]["kernel"][:, 0],
                                  base_params["layers"]["mlp"]["up_proj"]["kernel"])


@pytest.mark.parametrize("change,message", [
    (dict(experts=()), "at least one fine-tuned model"),
    (dict(top_k=3), "--top-k=3 must be between 1 and the number of experts"),
    (dict(router="hidden"), "needs --prompts"),
    (dict(experts=("/nonexistent/model",)), "no such directory"),
])
def test_bad_arguments_write_nothing(models, tmp_path, change, message):
    base, e1, e2 = models
    out = tmp_path / "never"
    args = dict(base=str(base), experts=(str(e1), str(e2)), out=str(out), router="noisy", top_k=2)
    with pytest.raises(mix.UsageError, match=message):
        mix.run(mix.MixArgs(**{**args, **change}))
    assert nothing_written(out)


def test_mismatched_experts_write_nothing(models, tmp_path):
    base, e1, _ = models
    odd = tmp_path / "odd"
    build_hf_llama(odd, seed=7, **{**SHAPE, "intermediate_size": 40})
    out = tmp_path / "never"
    with pytest.raises(moe.MixError, match="down_proj.*has shape"):
        mix.run(mix.MixArgs(base=str(base), experts=(str(e1), str(odd)), out=str(out), router="gateless"))
    assert nothing_written(out)


def test_prompts_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"expert": 0, "prompt": "ok"}\n{"expert": 5, "prompt": "x"}\n')
    with pytest.raises(mix.UsageError, match=r"p.jsonl:2: expert 5 is not an index in 0..1"):
        mix.read_prompts(str(bad), 2)
    bad.write_text('{"expert": 0, "prompt": "ok"}\nnot json\n')
    with pytest.raises(mix.UsageError, match=r"p.jsonl:2: expected a JSON object"):
        mix.read_prompts(str(bad), 2)
    bad.write_text('{"expert": 0, "prompt": "ok"}\n')
    with pytest.raises(mix.UsageError, match=r"experts \[1\] have no prompts"):
        mix.read_prompts(str(bad), 2)

"""An lm-evaluation-harness model backed by a jaxcollab Llama, for the old-knowledge suites (MMLU, ARC, ...).

    from jaxcollab.evaluation.lm_eval_adapter import JaxcollabLM
    lm = JaxcollabLM(cfg, params, tokenizer, lora=adapter, batch_size=8, max_length=2048)
    results = lm_eval.simple_evaluate(model=lm, tasks=["arc_challenge"])

or, once this module is imported, by name: `simple_evaluate(model="jaxcollab",
model_args="pretrained=/path/to/hf_dir,peft=/path/to/adapter")` (the tokenizer is read from
`pretrained` unless `tokenizer=` names another local directory).

From the command line: lm-eval 0.4.13 finds models only in its own registry (its built-in
`MODEL_MAPPING` plus whatever was imported before the lookup); it reads no entry points and no plugin
path, and `--include_path` only adds task YAMLs. So the `lm_eval` script itself cannot know "jaxcollab"
(upstream issues #1621 and #3282). This module is a drop-in replacement for it that registers the
adapter first and then runs lm-eval's own command line with the same arguments:

    python -m jaxcollab.evaluation.lm_eval_adapter run --model jaxcollab \
        --model_args pretrained=/path/to/hf_dir,dtype=float32 --tasks mmlu --batch_size 8

- `loglikelihood` and `loglikelihood_rolling` are `jaxcollab.evaluation.loglik` (lm-eval's tokenization
  and windows for tokenizers with and without BOS, see there).
- `generate_until` decodes greedily (`jaxcollab.evaluation.generate.greedy`) from `start_ids + context`
  (BOS first only for a tokenizer that prepends it, as lm-eval's HF backend encodes prompts),
  left-truncated to `max_length - max_gen_toks` tokens as lm-eval's HF backend does, for `max_gen_toks`
  new tokens (aliases `max_new_tokens`, `max_tokens`, `max_completion_tokens`; default from the
  constructor) or until an EOS id. The decoded text is cut at the earliest occurrence of any `until`
  string. Sampling settings (`do_sample=True`, `temperature > 0`) are not supported: such requests are
  decoded greedily with a warning.

lm-eval is an optional dependency (the `test` extra pins it): this module imports without it, and only
constructing `JaxcollabLM` (or running `main`) needs it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxcollab.data.tokenizers import HFTokenizer, Tokenizer
from jaxcollab.evaluation.loglik import DEFAULT_BATCH_SIZE, loglikelihood, loglikelihood_rolling, start_with_bos
from jaxcollab.model.config import LlamaConfig

logger = logging.getLogger(__name__)

__all__ = ["LM_EVAL_AVAILABLE", "MODEL_NAME", "JaxcollabLM", "cut_at_stop_strings", "generation_settings", "main",
           "register"]

MODEL_NAME = "jaxcollab"
DEFAULT_MAX_GEN_TOKS = 256
_MAX_TOKEN_ALIASES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")

try:
    from lm_eval.api.model import LM as _LMBase

    LM_EVAL_AVAILABLE = True
except ImportError:  # lm-eval not installed: the class exists but cannot be constructed
    _LMBase = object  # type: ignore[assignment,misc]
    LM_EVAL_AVAILABLE = False


def cut_at_stop_strings(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


def generation_settings(gen_kwargs: dict, default_max_gen_toks: int) -> tuple[list[str], int]:
    """(stop strings, max new tokens) of an lm-eval `generate_until` request's keyword arguments."""
    if not isinstance(gen_kwargs, dict):
        raise ValueError(f"generate_until: expected a dict of generation settings, got {gen_kwargs!r}")
    until = gen_kwargs.get("until")
    if until is None:
        stops: list[str] = []
    elif isinstance(until, str):
        stops = [until]
    elif isinstance(until, Sequence) and all(isinstance(s, str) for s in until):
        stops = list(until)
    else:
        raise ValueError(f"generate_until: 'until' must be a string or a list of strings, got {until!r}")
    max_gen_toks = default_max_gen_toks
    for alias in _MAX_TOKEN_ALIASES:
        if gen_kwargs.get(alias) is not None:
            max_gen_toks = int(gen_kwargs[alias])
            break
    if max_gen_toks < 1:
        raise ValueError(f"generate_until: max_gen_toks must be >= 1, got {max_gen_toks}")
    if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0.0) > 0.0:
        logger.warning("generate_until: sampling (%s) is not supported; decoding greedily",
                       {k: gen_kwargs.get(k) for k in ("do_sample", "temperature")})
    return stops, max_gen_toks


def _parse_batch_size(batch_size: int | str | None) -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, int):
        return batch_size
    if str(batch_size).isdigit():
        return int(batch_size)
    logger.warning("batch_size=%r is not supported (only a fixed size); using %d", batch_size,
                   DEFAULT_BATCH_SIZE)
    return DEFAULT_BATCH_SIZE


class JaxcollabLM(_LMBase):
    """lm-eval `LM` over (cfg, params, tokenizer, optional LoRA adapter) or a local Hugging Face directory.

    batch_size: rows per forward pass; max_length: the most tokens the model reads (default
    `cfg.max_position_embeddings`); max_gen_toks: new tokens when a request does not say; eos_ids: ids that
    end generation (default the tokenizer's EOS). `device` and `max_batch_size`, which lm-eval passes when
    it builds a model by name, are accepted and ignored (JAX places the arrays).
    """

    def __init__(
        self,
        cfg: LlamaConfig | None = None,
        params: dict | None = None,
        tokenizer: Tokenizer | str | None = None,
        lora: Any = None,
        *,
        pretrained: str | Path | None = None,
        peft: str | Path | None = None,
        dtype: str = "float32",
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int | str | None = None,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        eos_ids: int | Sequence[int] | None = None,
        device: str | None = None,
        max_batch_size: int | str | None = None,
    ) -> None:
        if not LM_EVAL_AVAILABLE:
            raise ImportError("JaxcollabLM needs lm-eval: pip install 'lm-eval==0.4.13'")
        super().__init__()
        if pretrained is not None:
            if cfg is not None or params is not None:
                raise ValueError("pass either (cfg, params) or pretrained=, not both")
            from jaxcollab.model.hf import load_hf

            cfg, params = load_hf(pretrained, dtype=jnp.dtype(dtype))
            if tokenizer is None:
                tokenizer = str(pretrained)
        if cfg is None or params is None:
            raise ValueError("JaxcollabLM needs (cfg, params) or pretrained=<Hugging Face directory>")
        if tokenizer is None:
            raise ValueError("JaxcollabLM needs a tokenizer (a jaxcollab Tokenizer or a local tokenizer directory)")
        if isinstance(tokenizer, str | Path):
            tokenizer = HFTokenizer(tokenizer)
        if peft is not None:
            if lora is not None:
                raise ValueError("pass either lora= or peft=, not both")
            from jaxcollab.lora import load_peft

            lora, _ = load_peft(peft, cfg, params=params)
        self.cfg = cfg
        self.params = params
        self.tokenizer = tokenizer
        self.lora = lora
        self.batch_size = _parse_batch_size(batch_size)
        self._max_length = None if max_length is None else int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        if eos_ids is None:
            eos_ids = [tokenizer.eos_id]
        self.eos_ids = [int(eos_ids)] if isinstance(eos_ids, int) else [int(i) for i in eos_ids]

    @property
    def max_length(self) -> int:
        return self.cfg.max_position_embeddings if self._max_length is None else self._max_length

    @property
    def tokenizer_name(self) -> str:
        return repr(self.tokenizer)

    def _scoring_kwargs(self) -> dict:
        return {"lora": self.lora, "batch_size": self.batch_size, "max_length": self.max_length}

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-probability, is_greedy) of each request's continuation given its context."""
        pairs = [tuple(request.args) for request in requests]
        return loglikelihood(self.cfg, self.params, self.tokenizer, pairs, **self._scoring_kwargs(),
                             progress=False if disable_tqdm else "loglikelihood")

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each request's whole text, in rolling windows of `max_length`."""
        texts = [request.args[0] for request in requests]
        return loglikelihood_rolling(self.cfg, self.params, self.tokenizer, texts, **self._scoring_kwargs(),
                                     progress=False if disable_tqdm else "loglikelihood_rolling")

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at its first stop string."""
        from jaxcollab.evaluation.generate import greedy

        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=repr)
            groups.setdefault(key, []).append(index)
        results = [""] * len(requests)
        eos = set(self.eos_ids)
        for indices in groups.values():
            stops, max_gen_toks = generation_settings(requests[indices[0]].args[1], self.max_gen_toks)
            max_context = self.max_length - max_gen_toks
            if max_context < 1:
                raise ValueError(f"generate_until: max_gen_toks={max_gen_toks} leaves no room for the context "
                                 f"within max_length={self.max_length}")
            prompts = [start_with_bos(self.tokenizer, self.tokenizer.encode(requests[i].args[0]))[-max_context:]
                       for i in indices]
            outputs = greedy(self.cfg, self.params, prompts, max_gen_toks, eos_id=self.eos_ids, lora=self.lora,
                             batch_size=self.batch_size, pad_id=self.tokenizer.pad_id)
            for index, new_tokens in zip(indices, outputs, strict=True):
                if new_tokens and new_tokens[-1] in eos:
                    new_tokens = new_tokens[:-1]
                results[index] = cut_at_stop_strings(self.tokenizer.decode(new_tokens), stops)
        return results


def register() -> None:
    """Register `JaxcollabLM` in lm-eval's model registry as "jaxcollab" (done on import; idempotent)."""
    import lm_eval.models  # noqa: F401  (lm-eval fills its built-in names only into an empty registry)
    from lm_eval.api.registry import model_registry, register_model

    current = model_registry.get(MODEL_NAME, None)
    if current is None:
        register_model(MODEL_NAME)(JaxcollabLM)
    elif current is not JaxcollabLM:
        raise ValueError(f"lm-eval model name {MODEL_NAME!r} is already taken by {current!r}")


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (`lm_eval ...`, same arguments) with `--model jaxcollab` registered."""
    if not LM_EVAL_AVAILABLE:
        raise SystemExit("the lm-eval command line needs lm-eval: pip install 'lm-eval==0.4.13'")
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if LM_EVAL_AVAILABLE and __name__ != "__main__":
    register()

if __name__ == "__main__":  # run as a script: register and run the importable module, not this copy
    from jaxcollab.evaluation import lm_eval_adapter as _adapter

    _adapter.main()

"""generate: greedy decoding tokens/s, `jaxcollab.evaluation.generate.greedy` against transformers
`model.generate(do_sample=False)` on the same checkpoint, the same prompts (one batch of different lengths,
left-padded) and the same number of new tokens, EOS disabled in both, KV caches on both sides (transformers'
default dynamic cache). The longest prompt is a multiple of jaxcollab's length bucket and the batch a power of
two, so both sides run the same padded shapes. Both must produce the same tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from benchmarks.checkpoints import hf_checkpoint
from benchmarks.common import CompileCounter, Options, Result, alternate, median, timed
from benchmarks.shapes import CPU_SMALL, TINY, ModelShape


@dataclasses.dataclass(frozen=True)
class GenerateSetting:
    shape: ModelShape
    prompt_lengths: tuple[int, ...]
    max_new_tokens: int


def setting(opts: Options) -> GenerateSetting:
    # A wider initialisation than training's keeps greedy choices away from near-ties between the libraries'
    # float32 rounding (random weights at 0.02 give almost flat logits).
    if opts.tiny:
        return GenerateSetting(dataclasses.replace(TINY, init_range=0.5), (5, 23, 41, 64), 8)
    return GenerateSetting(dataclasses.replace(CPU_SMALL, init_range=0.1), (17, 30, 45, 64, 77, 96, 110, 128), 64)


def make_prompts(lengths: tuple[int, ...], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


class Ours:
    def __init__(self, checkpoint: Any, prompts: list[list[int]]):
        from jaxcollab import model
        from jaxcollab.evaluation import generate

        self.cfg, self.params = model.load_hf(checkpoint)
        self.greedy, self.prompts = generate.greedy, prompts

    def __call__(self, max_new_tokens: int) -> list[list[int]]:
        return self.greedy(self.cfg, self.params, self.prompts, max_new_tokens, eos_id=None)


class Peer:
    def __init__(self, checkpoint: Any, prompts: list[list[int]]):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0
        length = max(len(p) for p in prompts)
        self.ids = torch.zeros((len(prompts), length), dtype=torch.long)
        self.mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, p in enumerate(prompts):
            self.ids[row, length - len(p):] = torch.tensor(p)
            self.mask[row, length - len(p):] = 1

    def __call__(self, max_new_tokens: int) -> list[list[int]]:
        with self.torch.no_grad():
            out = self.model.generate(input_ids=self.ids, attention_mask=self.mask, do_sample=False,
                                      max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                      eos_token_id=None, pad_token_id=0)
        return out[:, self.ids.shape[1]:].tolist()


def run(opts: Options) -> Result:
    import torch

    torch.set_num_threads(opts.threads)
    st = setting(opts)
    checkpoint = hf_checkpoint(opts.workdir / f"generate-{'tiny' if opts.tiny else opts.suite}", st.shape)
    prompts = make_prompts(st.prompt_lengths, st.shape.vocab)
    ours, peer = Ours(checkpoint, prompts), Peer(checkpoint, prompts)
    n_new = st.max_new_tokens
    counter = CompileCounter()
    first_s, ours_tokens = timed(lambda: ours(n_new))
    compile_info = counter.summary()
    peer_tokens = peer(n_new)
    new_tokens = len(prompts) * n_new
    a, b = alternate(lambda: new_tokens / timed(lambda: ours(n_new))[0],
                     lambda: new_tokens / timed(lambda: peer(n_new))[0], opts.repeats)
    # prefill (+ the first token) alone, to split the time into prefill and per-token decoding
    ours(1)
    prefill_ours = median([timed(lambda: ours(1))[0] for _ in range(2)])
    prefill_peer = median([timed(lambda: peer(1))[0] for _ in range(2)])
    whole_ours, whole_peer = new_tokens / median(a), new_tokens / median(b)
    floor_ms = 1e3 * st.shape.matmul_params() * 4 / weight_stream_rate(st.shape, len(prompts))
    chain_ms = 1e3 * matmul_chain_seconds(st.shape, len(prompts))
    same_rows = sum(x == y for x, y in zip(ours_tokens, peer_tokens, strict=True))
    mismatch = _first_mismatch(ours_tokens, peer_tokens)
    details = [
        f"model {st.shape.describe()} init_range={st.shape.init_range} dtype=float32",
        f"prompts={len(prompts)} lengths={list(st.prompt_lengths)} (left-padded to {max(st.prompt_lengths)}) "
        f"max_new_tokens={n_new} eos=disabled repeats={len(a)} (median)",
        f"same_tokens={same_rows == len(prompts)} rows_equal={same_rows}/{len(prompts)}"
        + (f" first_mismatch(row, position)={mismatch}" if mismatch else ""),
        f"ours_phases_s prefill_and_first_token={prefill_ours:.3f} decode_per_token_ms="
        f"{1e3 * (whole_ours - prefill_ours) / max(n_new - 1, 1):.2f} whole={whole_ours:.3f} "
        f"first_call_s={first_s:.2f} {compile_info}",
        f"peer_phases_s prefill_and_first_token={prefill_peer:.3f} decode_per_token_ms="
        f"{1e3 * (whole_peer - prefill_peer) / max(n_new - 1, 1):.2f} whole={whole_peer:.3f}",
        f"peer_settings torch_threads={opts.threads} attn=sdpa eager dynamic_cache",
        f"decode_floor_ms_per_token={floor_ms:.2f} (every weight that multiplies activations read once per step, "
        f"at the rate a jitted [{len(prompts)}, d] x [d, n] matmul streams float32 weights here); "
        f"peer_decode/floor={1e3 * (whole_peer - prefill_peer) / max(n_new - 1, 1) / floor_ms:.2f} (the most "
        "any implementation can gain on decoding at this batch and dtype)",
        f"matmul_chain_ms_per_token={chain_ms:.2f} (a jitted loop of just this model's decode matmuls, one "
        "float32 buffer per kernel: what XLA itself reaches on them, with no attention, norms or sampling)",
    ]
    return Result("generate", median(a), median(b), "tokens/s", peer_name="transformers generate (torch eager)",
                  details=details, checks={"same_tokens": same_rows == len(prompts)},
                  samples={"ours": a, "peer": b})


def weight_stream_rate(shape: ModelShape, batch: int) -> float:
    """Bytes/s at which a jitted matmul of `batch` rows reads a float32 weight as large as the model's."""
    import jax
    import jax.numpy as jnp

    columns = max(1, shape.matmul_params() // shape.hidden)
    weight = jnp.ones((shape.hidden, columns), jnp.float32)
    rows = jnp.ones((batch, shape.hidden), jnp.float32)
    matmul = jax.jit(jnp.dot)
    matmul(rows, weight).block_until_ready()
    seconds = median([timed(lambda: matmul(rows, weight).block_until_ready())[0] for _ in range(5)])
    return weight.nbytes / seconds


def matmul_chain_seconds(shape: ModelShape, batch: int, steps: int = 16) -> float:
    """Seconds per step of a jitted loop that runs only the matmuls of one decode step: per layer q, k, v,
    o, gate, up and down on [batch, in] rows, then the LM head, each kernel its own buffer (zeros: the
    timing does not depend on the values, and zeros keep denormals away)."""
    import jax
    import jax.numpy as jnp

    d, f, hd = shape.hidden, shape.intermediate, shape.hd
    q_out, kv_out = shape.heads * hd, shape.kv_heads * hd
    layer = {"q": (d, q_out), "k": (d, kv_out), "v": (d, kv_out), "o": (q_out, d), "gate": (d, f), "up": (d, f),
             "down": (f, d)}
    kernels = [{name: jnp.zeros(dims, jnp.float32) for name, dims in layer.items()} for _ in range(shape.layers)]
    head = jnp.zeros((d, shape.vocab), jnp.float32)

    def one_step(x: Any, kernels: list[dict], head: Any) -> Any:
        for w in kernels:
            q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
            attended = q + jnp.tile(k + v, q_out // kv_out)
            x = x + attended @ w["o"]
            x = x + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
        return x + (x @ head)[:, :d]

    @jax.jit
    def run(x: Any, kernels: list[dict], head: Any, n: Any) -> Any:  # weights as arguments: never folded
        return jax.lax.fori_loop(0, n, lambda _, y: one_step(y, kernels, head), x)

    rows = jnp.zeros((batch, d), jnp.float32)
    run(rows, kernels, head, 1).block_until_ready()
    one = median([timed(lambda: run(rows, kernels, head, 1).block_until_ready())[0] for _ in range(3)])
    many = median([timed(lambda: run(rows, kernels, head, steps + 1).block_until_ready())[0] for _ in range(3)])
    return (many - one) / steps


def _first_mismatch(a: list[list[int]], b: list[list[int]]) -> tuple[int, int] | None:
    for row, (x, y) in enumerate(zip(a, b, strict=True)):
        for position, (s, t) in enumerate(zip(x, y, strict=False)):
            if s != t:
                return row, position
        if len(x) != len(y):
            return row, min(len(x), len(y))
    return None

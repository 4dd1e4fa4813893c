"""train_step_lora / train_step_fft: tokens per second of one training step, jaxcollab against transformers
(+ PEFT for LoRA) in torch, on the same model, batch, sequence length, dtype, optimizer and loss.

Ours is `jaxcollab.train.Trainer.fit` (its jitted step with the state donated, batches placed per step);
the peer is the plain PyTorch loop a transformers user writes: forward with `labels`, backward,
`clip_grad_norm_(1.0)`, `AdamW.step`, `zero_grad`. Both: AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight
decay) after global-norm clipping at 1.0, the loss averaged over every token, no dropout, no KV cache,
causal attention through the fused SDPA path each library picks. On the CPU suite both sides load the
same checkpoint and the first loss is checked to agree; the sides alternate repeat by repeat in one
process. On the GPU suite each side runs in its own child process (each then has the whole GPU) at the
largest batch of the candidates that fits both, with remat ("full"; torch: gradient checkpointing), and
ours computes the LM head + loss 256 positions at a time (`TrainConfig.loss_chunk`; `--loss-chunk`
changes it, 0 for the whole logits as the CPU suite).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.checkpoints import hf_checkpoint
from benchmarks.common import (
    Options,
    Result,
    alternate,
    median,
    python_env,
    run_child,
    timed,
)
from benchmarks.shapes import CPU_SMALL, LLAMA3_8B, LLAMA3_8B_REDUCED, LORA_TARGETS, TINY, ModelShape

LR = 1e-4
LORA_RANK, LORA_ALPHA = 16, 32.0
CHILD_TAG = "CHILD_JSON "
PHASE_STEPS = 2  # steps timed per phase (after one untimed)


@dataclasses.dataclass(frozen=True)
class TrainSetting:
    shape: ModelShape
    batches: tuple[int, ...]  # candidate batch sizes, largest first: the largest that fits both sides is used
    seq_len: int
    dtype: str
    remat: str
    steps: int  # timed steps per repeat
    warmup: int  # untimed steps first (compilation, allocator warm-up)
    in_process: bool  # alternate the sides in this process (CPU) or run each in a child (GPU)
    matmul_size: int  # square matmul that measures the peak rate
    loss_chunk: int = 0  # ours: positions per chunk of the LM head + loss (TrainConfig.loss_chunk)

    @property
    def device_kind(self) -> str:
        return "gpu" if not self.in_process else "cpu"


def setting(opts: Options) -> TrainSetting:
    st = _suite_setting(opts)
    return st if opts.loss_chunk is None else dataclasses.replace(st, loss_chunk=opts.loss_chunk)


def _suite_setting(opts: Options) -> TrainSetting:
    if opts.suite == "gpu" and (opts.reduced or opts.tiny):
        return TrainSetting(LLAMA3_8B_REDUCED, (4, 2, 1), 128, "bfloat16", "full", 2, 1, False, 512, 32)
    if opts.suite == "gpu":
        return TrainSetting(LLAMA3_8B, (64, 32, 16, 8, 4, 2, 1), 2048, "bfloat16", "full", 5, 2, False, 8192, 256)
    if opts.tiny:
        return TrainSetting(TINY, (2,), 32, "float32", "none", 2, 1, True, 256)
    return TrainSetting(CPU_SMALL, (8,), 256, "float32", "none", 2, 1, True, 2048)


def make_batches(vocab: int, batch: int, seq_len: int, count: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (batch, seq_len), dtype=np.int32) for _ in range(count)]


def is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemory", "out of memory", "Out of memory"))


# ----------------------------------------------------------------------------------------------------- ours
class OursTrain:
    """jaxcollab: `Trainer` on the LoRA or full-fine-tuning mask."""

    def __init__(self, st: TrainSetting, lora: bool, batch: int, checkpoint: Path | None):
        import jax

        from jaxcollab import lora as lora_lib
        from jaxcollab import model, train

        self.jax, self.train = jax, train
        if checkpoint is not None:
            cfg, params = model.load_hf(checkpoint, dtype=st.dtype, remat_policy=st.remat)
        else:
            cfg = st.shape.jax_config(st.dtype, st.remat)
            params = model.init_params(cfg, jax.random.key(0))
        variables: dict[str, Any] = {"params": params}
        if lora:
            lcfg = lora_lib.LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA, target_modules=LORA_TARGETS)
            variables["lora"] = lora_lib.init(lcfg, cfg, params, jax.random.key(1))
            mask = train.lora_mask(variables)
        else:
            mask = train.full_finetune_mask(variables)
        self.tcfg = train.TrainConfig(learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, num_steps=1,
                                      progress=False, log_every=10**9, checkpoint_every=10**9,
                                      loss_chunk=st.loss_chunk)
        self.cfg = cfg
        self.trainer = train.Trainer(cfg, self.tcfg, variables, mask, donate_variables=True)
        self.num_trainable = self.trainer.num_trainable
        self.host_batches = [{"tokens": t, "loss_mask": np.ones(t.shape, np.float32)}
                             for t in make_batches(cfg.vocab_size, batch, st.seq_len)]
        self._stream = itertools.cycle(self.host_batches)

    def run_steps(self, n: int) -> float:
        trainer = self.trainer
        seconds, _ = timed(lambda: self.jax.block_until_ready(
            trainer.fit(self._stream, num_steps=trainer.step + n)))
        return seconds

    def _loss_fn(self) -> Any:
        """The mean loss (forward only), with the step's chunked head loss when it has one."""
        from jaxcollab import model
        from jaxcollab.model.head_loss import chunked_token_cross_entropy
        from jaxcollab.model.llama import forward_hidden, matmul_precision, output_kernel

        cfg, train, chunk = self.cfg, self.train, self.tcfg.loss_chunk

        def loss(trainable: Any, frozen: Any, batch: dict) -> Any:
            variables = train.join(trainable, frozen)
            params, tokens, adapter = variables["params"], batch["tokens"], variables.get("lora")
            if chunk:
                total, count = chunked_token_cross_entropy(
                    forward_hidden(cfg, params, tokens, adapter), output_kernel(cfg, params), tokens,
                    batch["loss_mask"], chunk=chunk, precision=matmul_precision(cfg))
            else:
                logits = model.forward(cfg, params, tokens, lora=adapter)
                total, count = train.token_cross_entropy(logits, tokens, batch["loss_mask"])
            return total / count

        return self.jax.jit(loss)

    def initial_loss(self) -> float:
        state = self.trainer.state
        return float(self._loss_fn()(state.trainable, self.trainer.frozen, self.host_batches[0]))

    def phases(self, n: int) -> dict[str, float]:
        """Seconds per step of the forward pass alone and of forward + backward (the step's gradients)."""
        jax, trainer = self.jax, self.trainer
        forward = self._loss_fn()
        gradients = jax.jit(self.train.make_gradients(self.cfg, self.tcfg))
        key = jax.random.key(0)
        batch = jax.device_put(self.host_batches[0])

        def run(fn: Any) -> float:
            jax.block_until_ready(fn())
            return timed(lambda: [jax.block_until_ready(fn()) for _ in range(n)])[0] / n

        fwd = run(lambda: forward(trainer.state.trainable, trainer.frozen, batch))
        fwd_bwd = run(lambda: gradients(trainer.state.trainable, trainer.frozen, batch, key))
        return {"forward": fwd, "forward_backward": fwd_bwd}


# ----------------------------------------------------------------------------------------------------- peer
class PeerTrain:
    """transformers LlamaForCausalLM (+ PEFT LoRA) and torch AdamW, the standard eager loop."""

    @staticmethod
    def describe(lora: bool) -> str:
        return f"transformers {'+ peft ' if lora else ''}(torch eager)"

    def __init__(self, st: TrainSetting, lora: bool, batch: int, checkpoint: Path | None, device: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch, self.device = torch, torch.device(device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[st.dtype]
        if checkpoint is not None:
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa")
            model = model.to(self.device)
        else:
            torch.manual_seed(0)
            with self.device:
                model = AutoModelForCausalLM.from_config(st.shape.hf_config(st.dtype), dtype=dtype,
                                                         attn_implementation="sdpa")
        model.config.use_cache = False
        if st.remat != "none":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                     target_modules=list(LORA_TARGETS), bias="none"))
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in self.params)
        self.fused = _fused_adamw_works(torch, self.device)
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     fused=self.fused or None)
        self.batches = [torch.from_numpy(t).long().to(self.device)
                        for t in make_batches(st.shape.vocab, batch, st.seq_len)]
        self._stream = itertools.cycle(self.batches)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _step(self, tokens: Any) -> None:
        loss = self.model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run_steps(self, n: int) -> float:
        def steps() -> None:
            for _ in range(n):
                self._step(next(self._stream))
            self._sync()

        return timed(steps)[0]

    def initial_loss(self) -> float:
        with self.torch.no_grad():
            tokens = self.batches[0]
            return float(self.model(input_ids=tokens, labels=tokens, use_cache=False).loss)

    def phases(self, n: int) -> dict[str, float]:
        """Seconds per step of forward, backward and clipping + optimizer, each phase synchronised."""
        import time

        totals = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        torch = self.torch
        for _ in range(n):
            tokens = next(self._stream)
            self._sync()
            t0 = time.perf_counter()
            loss = self.model(input_ids=tokens, labels=tokens, use_cache=False).loss
            self._sync()
            t1 = time.perf_counter()
            loss.backward()
            self._sync()
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self._sync()
            t3 = time.perf_counter()
            for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                totals[key] += seconds
        return {k: v / n for k, v in totals.items()}


def _fused_adamw_works(torch: Any, device: Any) -> bool:
    """torch's fused AdamW (one kernel over all parameters) where this build supports it on `device`."""
    try:
        p = torch.nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.zeros(2, device=device)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


# ------------------------------------------------------------------------------------------- matmul peak
@functools.cache
def jax_matmul_rate(n: int, dtype: str) -> float:
    """FLOP/s of an n x n x n jnp.dot in `dtype` (median of 5 after a warm-up)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    times = [timed(lambda: dot(a, a).block_until_ready())[0] for _ in range(5)]
    return 2 * n**3 / median(times)


@functools.cache
def torch_matmul_rate(n: int, dtype: str, device: str) -> float:
    import torch

    a = torch.ones((n, n), dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype], device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ a
    sync()

    def once() -> None:
        a @ a
        sync()

    return 2 * n**3 / median([timed(once)[0] for _ in range(5)])


# -------------------------------------------------------------------------------------------- measuring
def measure_side(side: Any, st: TrainSetting, repeats: int, batch: int) -> dict[str, Any]:
    """One side alone: warm-up (compile), timed repeats, phases."""
    from benchmarks.common import CompileCounter

    counter = CompileCounter() if isinstance(side, OursTrain) else None
    loss = side.initial_loss()
    first = side.run_steps(st.warmup)
    samples = [batch * st.seq_len * st.steps / side.run_steps(st.steps) for _ in range(repeats)]
    compile_info = counter.summary() if counter else ""
    return {"batch": batch, "samples": samples, "loss": loss, "warmup_s": first, "compile": compile_info,
            "phases": side.phases(PHASE_STEPS), "trainable": side.num_trainable}


def _build(side: str, st: TrainSetting, lora: bool, batch: int, checkpoint: Path | None, device: str) -> Any:
    if side == "ours":
        return OursTrain(st, lora, batch, checkpoint)
    return PeerTrain(st, lora, batch, checkpoint, device)


def run_side_fitting(side: str, st: TrainSetting, lora: bool, batches: list[int], repeats: int,
                     device: str) -> dict[str, Any]:
    """The side at the largest batch of `batches` that fits in memory (tried largest first)."""
    tried = []
    for batch in batches:
        built = None
        try:
            built = _build(side, st, lora, batch, None, device)
            result = measure_side(built, st, repeats, batch)
            result["oom_batches"] = tried
            if side == "ours":
                result["matmul_rate"] = jax_matmul_rate(st.matmul_size, st.dtype)
            else:
                result["matmul_rate"] = torch_matmul_rate(st.matmul_size, st.dtype, device)
                result["fused_adamw"] = built.fused
            return result
        except Exception as error:  # noqa: BLE001 - out-of-memory errors differ between JAX and torch
            if not is_oom(error):
                raise
            tried.append(batch)
            del built
            gc.collect()
            _free_memory(side)
    raise RuntimeError(f"{side}: no batch of {batches} fits in memory")


def _free_memory(side: str) -> None:
    if side == "ours":
        import jax

        jax.clear_caches()
    else:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _child(opts: Options, kind: str, side: str, batches: list[int]) -> dict[str, Any]:
    args = {"opts": {**dataclasses.asdict(opts), "workdir": str(opts.workdir)}, "kind": kind, "side": side,
            "batches": batches}
    env = python_env()
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    run = run_child([sys.executable, "-m", "benchmarks.bench_train", json.dumps(args)], env=env)
    if run.returncode != 0:
        raise RuntimeError(f"train child ({side}, {kind}) failed:\n{run.stderr[-4000:]}")
    line = next(x for x in run.stdout.splitlines() if x.startswith(CHILD_TAG))
    return json.loads(line[len(CHILD_TAG):])


def _in_process(opts: Options, st: TrainSetting, lora: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    torch.set_num_threads(opts.threads)
    batch = st.batches[0]
    checkpoint = hf_checkpoint(opts.workdir / f"train-{'tiny' if opts.tiny else opts.suite}", st.shape,
                               dtype=st.dtype)
    ours, peer = OursTrain(st, lora, batch, checkpoint), PeerTrain(st, lora, batch, checkpoint, "cpu")
    from benchmarks.common import CompileCounter

    counter = CompileCounter()
    results = [{"batch": batch, "loss": side.initial_loss(), "trainable": side.num_trainable} for side in (ours, peer)]
    results[0]["warmup_s"] = ours.run_steps(st.warmup)
    results[0]["compile"] = counter.summary()
    results[1]["warmup_s"] = peer.run_steps(st.warmup)
    tokens = batch * st.seq_len * st.steps
    a, b = alternate(lambda: tokens / ours.run_steps(st.steps), lambda: tokens / peer.run_steps(st.steps),
                     opts.repeats)
    results[0]["samples"], results[1]["samples"] = a, b
    for result, side in zip(results, (ours, peer), strict=True):
        result["phases"] = side.phases(PHASE_STEPS)
    results[0]["matmul_rate"] = jax_matmul_rate(st.matmul_size, st.dtype)
    results[1]["matmul_rate"] = torch_matmul_rate(st.matmul_size, st.dtype, "cpu")
    results[1]["fused_adamw"] = peer.fused
    return results[0], results[1]


def _in_children(opts: Options, st: TrainSetting, kind: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    notes = []
    ours = _child(opts, kind, "ours", list(st.batches))
    peer = _child(opts, kind, "peer", [b for b in st.batches if b <= ours["batch"]])
    if peer["batch"] < ours["batch"]:
        best = median(ours["samples"])
        notes.append(f"ours_alone largest_batch={ours['batch']} tokens_per_s={best:.1f}")
        ours = _child(opts, kind, "ours", [peer["batch"]])
    return ours, peer, notes


def run(opts: Options, kind: str) -> Result:
    """kind: "lora" or "fft"."""
    st = setting(opts)
    lora = kind == "lora"
    notes: list[str] = []
    if st.in_process:
        ours, peer = _in_process(opts, st, lora)
    else:
        ours, peer, notes = _in_children(opts, st, kind)
    return _result(opts, st, kind, ours, peer, notes)


def _result(opts: Options, st: TrainSetting, kind: str, ours: dict, peer: dict, notes: list[str]) -> Result:
    lora = kind == "lora"
    batch = ours["batch"]
    flops = st.shape.train_flops_per_token(st.seq_len, LORA_RANK if lora else None)
    o, p = median(ours["samples"]), median(peer["samples"])
    giga = 1e12 if st.device_kind == "gpu" else 1e9
    unit = "TFLOP/s" if giga == 1e12 else "GFLOP/s"
    details = [
        f"model {st.shape.describe()}",
        f"batch={batch} seq={st.seq_len} tokens_per_step={batch * st.seq_len} dtype={st.dtype} remat={st.remat} "
        f"ours_loss_chunk={st.loss_chunk or 'whole_logits'} "
        f"steps_per_repeat={st.steps} warmup_steps={st.warmup} repeats={len(ours['samples'])} (median)",
        f"optimizer AdamW lr={LR} betas=(0.9,0.999) eps=1e-8 weight_decay=0 clip_global_norm=1.0; loss: mean over "
        "all B*(T-1) next-token predictions",
        f"trainable ours={ours['trainable']} peer={peer['trainable']}"
        + (f" lora r={LORA_RANK} alpha={LORA_ALPHA:g} dropout=0 targets={','.join(LORA_TARGETS)}" if lora else ""),
        f"initial_loss ours={ours['loss']:.6f} peer={peer['loss']:.6f}",
        f"flops_per_token={flops:.4g} achieved_{unit} ours={o * flops / giga:.2f} peer={p * flops / giga:.2f}",
        f"matmul_peak_{unit} jax={ours['matmul_rate'] / giga:.2f} torch={peer['matmul_rate'] / giga:.2f} "
        f"({st.matmul_size}^3 {st.dtype}) mfu ours={o * flops / ours['matmul_rate']:.3f} "
        f"peer={p * flops / ours['matmul_rate']:.3f} (against the jnp.dot rate); ratio_ceiling="
        f"{ours['matmul_rate'] / (p * flops):.2f} (the ratio of a step at the full matmul rate)",
        "ours_phases_ms_per_step " + _phases_ms(ours["phases"], 1e3 * batch * st.seq_len / o)
        + f" first_{st.warmup}_steps_s={ours['warmup_s']:.2f} {ours.get('compile', '')}",
        "peer_phases_ms_per_step " + _phases_ms(peer["phases"], 1e3 * batch * st.seq_len / p)
        + f" first_{st.warmup}_steps_s={peer['warmup_s']:.2f}",
        f"peer_settings torch_threads={opts.threads} attn=sdpa eager fused_adamw={peer.get('fused_adamw')} "
        f"use_cache=False{' gradient_checkpointing=non-reentrant' if st.remat != 'none' else ''}",
        *notes,
    ]
    checks = {}
    if st.in_process:  # both sides loaded the same checkpoint
        rel = abs(ours["loss"] - peer["loss"]) / abs(peer["loss"])
        checks["same_initial_loss"] = rel <= (1e-4 if st.dtype == "float32" else 2e-2)
    return Result(f"train_step_{kind}", o, p, "tokens/s", peer_name=PeerTrain.describe(lora), details=details,
                  checks=checks, samples={"ours": ours["samples"], "peer": peer["samples"]})


def _phases_ms(phases: dict[str, float], step_ms: float) -> str:
    parts = [f"step={step_ms:.1f}"]
    if "forward_backward" in phases:  # ours: forward, forward+backward; the rest of the step is the optimizer
        fwd, fb = phases["forward"] * 1e3, phases["forward_backward"] * 1e3
        parts += [f"forward={fwd:.1f}", f"backward={fb - fwd:.1f}", f"optimizer_and_rest={step_ms - fb:.1f}"]
    else:
        parts += [f"{k}={v * 1e3:.1f}" for k, v in phases.items()]
    return " ".join(parts)


def _child_main(raw: str) -> None:
    args = json.loads(raw)
    opts = Options(**{**args["opts"], "workdir": Path(args["opts"]["workdir"])})
    st = setting(opts)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(opts.threads)
    result = run_side_fitting(args["side"], st, args["kind"] == "lora", args["batches"], opts.repeats, device)
    print(CHILD_TAG + json.dumps(result), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1])

"""Device memory of a compiled training step, with the whole logits and with the chunked LM head loss.

Compiles (never runs) the jitted LoRA or full-fine-tuning step of a model shape from abstract inputs, so
the Llama 3 8B shape needs no weights and no accelerator, and prints XLA's buffer assignment for each
`TrainConfig.loss_chunk`: the temporary buffers (activations, logits, gradients in flight), the arguments
(parameters, optimizer state, batch) and the peak. `--head-only` compiles just the LM head and the loss
with their gradients (from the final hidden states), the part that `loss_chunk` changes. The figures are
XLA's plan for the backend it compiles for; on a CPU host that is XLA:CPU's, a proxy for a GPU's (XLA:CPU
materialises the attention scores, which a GPU's fused attention does not, and computes bf16 matmuls on
float32 copies).

    python -m benchmarks.step_memory --shape=llama3_8b --batch=8 --seq=2048 --chunks=0,512 [--head-only]
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.shapes import LLAMA3_8B, LLAMA3_8B_REDUCED, LORA_TARGETS, TINY, ModelShape
from jaxcollab import lora as lora_lib
from jaxcollab import train
from jaxcollab.model.head_loss import chunked_token_cross_entropy
from jaxcollab.model.llama import param_shapes, project

SHAPES = {"llama3_8b": LLAMA3_8B, "llama3_8b_reduced": LLAMA3_8B_REDUCED, "tiny": TINY}
GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class StepMemory:
    loss_chunk: int
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    peak_bytes: int


def _abstract_variables(shape: ModelShape, dtype: str, remat: str, lora: bool) -> tuple[Any, dict, Any]:
    cfg = shape.jax_config(dtype, remat)
    variables: dict[str, Any] = {"params": param_shapes(cfg)}
    if lora:
        lcfg = lora_lib.LoraConfig(rank=16, alpha=32.0, target_modules=LORA_TARGETS)
        variables["lora"] = jax.eval_shape(lambda: lora_lib.init(lcfg, cfg, None, jax.random.key(0)))
        return cfg, variables, train.lora_mask(variables)
    return cfg, variables, train.full_finetune_mask(variables)


def step_memory(shape: ModelShape, *, batch: int, seq: int, loss_chunk: int, lora: bool = True,
                dtype: str = "bfloat16", remat: str = "full") -> StepMemory:
    """XLA's memory plan for one jitted step (state donated, as `Trainer` runs it)."""
    cfg, variables, mask = _abstract_variables(shape, dtype, remat, lora)
    tcfg = train.TrainConfig(learning_rate=1e-4, loss_chunk=loss_chunk)
    tx = train.make_optimizer(tcfg, mask)
    trainable, frozen = train.partition(variables, mask)
    state = train.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable,
                             opt_state=jax.eval_shape(tx.init, trainable),
                             rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    batch_spec = {"tokens": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
                  "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}
    step = jax.jit(train.make_step(cfg, tcfg, tx), donate_argnums=(0,))
    stats = step.lower(state, frozen, batch_spec).compile().memory_analysis()
    temp, args = int(stats.temp_size_in_bytes), int(stats.argument_size_in_bytes)
    out, alias = int(stats.output_size_in_bytes), int(stats.alias_size_in_bytes)
    return StepMemory(loss_chunk, temp, args, out, alias, peak_bytes=args + out - alias + temp)


def head_memory(shape: ModelShape, *, batch: int, seq: int, loss_chunk: int, lora: bool = True,
                dtype: str = "bfloat16") -> StepMemory:
    """XLA's memory plan for the LM head + cross-entropy and their gradients (hidden states, and the head
    when it trains), as the training objective computes them for `loss_chunk`."""
    cfg = shape.jax_config(dtype)
    hidden = jax.ShapeDtypeStruct((batch, seq, shape.hidden), cfg.compute_dtype)
    kernel = jax.ShapeDtypeStruct((shape.hidden, shape.vocab), cfg.compute_dtype)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, seq), jnp.float32)

    def loss(h: jax.Array, w: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        if loss_chunk:
            total, count = chunked_token_cross_entropy(h, w, tokens, mask, chunk=loss_chunk)
        else:
            total, count = train.token_cross_entropy(project(h, w, None, jnp.float32), tokens, mask)
        return total / count

    grads = jax.jit(jax.value_and_grad(loss, argnums=0 if lora else (0, 1)))
    stats = grads.lower(hidden, kernel, tokens, mask).compile().memory_analysis()
    temp, args = int(stats.temp_size_in_bytes), int(stats.argument_size_in_bytes)
    out, alias = int(stats.output_size_in_bytes), int(stats.alias_size_in_bytes)
    return StepMemory(loss_chunk, temp, args, out, alias, peak_bytes=args + out - alias + temp)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3_8b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--chunks", default="0,512", help="comma-separated loss_chunk values (0: whole logits)")
    parser.add_argument("--fft", action="store_true", help="full fine-tuning instead of LoRA r=16 on all seven")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", default="full")
    parser.add_argument("--head-only", action="store_true", help="only the LM head + loss and their gradients")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    logits = args.batch * args.seq * shape.vocab * 4
    print(f"DETAIL model {shape.describe()} batch={args.batch} seq={args.seq} dtype={args.dtype} remat={args.remat} "
          f"{'fft' if args.fft else 'lora r=16 all seven'} backend={jax.default_backend()} "
          f"float32_logits_GiB={logits / GIB:.3f} compiled={'head_and_loss' if args.head_only else 'train_step'}")
    for chunk in (int(c) for c in args.chunks.split(",")):
        if args.head_only:
            m = head_memory(shape, batch=args.batch, seq=args.seq, loss_chunk=chunk, lora=not args.fft,
                            dtype=args.dtype)
        else:
            m = step_memory(shape, batch=args.batch, seq=args.seq, loss_chunk=chunk, lora=not args.fft,
                            dtype=args.dtype, remat=args.remat)
        print(f"MEMORY loss_chunk={chunk} temp_GiB={m.temp_bytes / GIB:.3f} arguments_GiB={m.argument_bytes / GIB:.3f} "
              f"outputs_GiB={m.output_bytes / GIB:.3f} aliased_GiB={m.alias_bytes / GIB:.3f} "
              f"peak_GiB={m.peak_bytes / GIB:.3f}", flush=True)


if __name__ == "__main__":
    main()

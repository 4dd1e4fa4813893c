"""Training: one mask says what trains; a jitted, sharded step; a loop that checkpoints and resumes exactly.

The model's variables are one tree, e.g. `{"params": base weights, "lora": LoraAdapter, "a_bank": ...}`;
every `LoraAdapter` in it is applied (the trained one and any frozen ones), and `TrainConfig.penalties`
are loss terms computed from it (o-LoRA's: `lora.olora_penalties`).
A boolean tree of the same shape (`mask`) says which leaves train:

- full fine-tuning: every leaf of "params" (`full_finetune_mask`),
- LoRA / o-LoRA: the leaves of "lora" (`lora_mask`),
- router-only MoE training: the leaves whose path contains "router" (`router_mask`).

`partition` splits the tree by the mask into a trainable and a frozen tree (each holds
`optax.MaskedNode()` where the other has leaves). Gradients are taken with respect to the trainable tree
only, so frozen weights never get gradients, and the optimizer is `optax.masked(..., mask)`: optimizer
state exists for trainable leaves only. FFT, LoRA, o-LoRA and router-only training differ only by mask.

The loss is token cross-entropy on answer tokens (the batch's `loss_mask`, see the batch format below),
normalised by the number of answer tokens in the whole effective batch (counted before gradient
accumulation splits the batch into micro-batches, so their gradients simply add up), plus the penalties
(once per step), plus for a mixture of experts the router load-balancing (and z-) losses averaged over
micro-batches. The step is jitted with the state donated. With `loss_chunk` set, the LM head and the
cross-entropy run a chunk of positions at a time (`model.head_loss`), so the [B, T, V] logits of a long
sequence and large vocabulary never exist at once.

Batch format (numpy or jax arrays, [batch, seq_len]): `tokens` int32; `loss_mask` float32, 1 where the
token at t is an answer token to be predicted from tokens < t; optional `segment_ids` (packed rows,
0 = padding) and `positions`.

`Trainer.fit` runs the loop: tqdm progress (loss, tokens/s), metrics to `metrics.jsonl` and TensorBoard,
orbax checkpoints of the trainable leaves, optimizer state, step, RNG and the data iterator's state every
`checkpoint_every` steps and at the end. Created again on the same workdir, it resumes from the last
complete checkpoint and ends with the same parameters as an uninterrupted run. A non-finite loss stops
the run with `NonFiniteLossError` naming the step; checkpoints are written only after the losses of all
steps before them were checked, so the last one on disk is good.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxcollab import lora as lora_lib
from jaxcollab.model.config import LlamaConfig
from jaxcollab.model.head_loss import chunked_token_cross_entropy
from jaxcollab.model.llama import forward, forward_hidden, forward_with_aux, matmul_precision, output_kernel
from jaxcollab.model.sharding import shard_batch, single_device_mesh
from jaxcollab.moe import load_balancing_loss, router_z_loss

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer and loop settings. Defaults follow the paper: AdamW, lr 2e-5 constant, no warm-up, wd 0."""

    learning_rate: float = 2e-5
    schedule: str = "constant"  # "constant" or "cosine" (warm-up then cosine decay to min_lr_ratio * lr)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    num_steps: int = 100
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # Loss terms on the variables, added once per step: (weight, fn(variables) -> scalar) pairs, e.g.
    # lora.olora_penalties(λ, λ2). The functions must be hashable (module-level): they key the compiled step.
    penalties: tuple[tuple[float, Callable[[dict], jax.Array]], ...] = ()
    router_aux_coef: float = 0.1  # Mixtral load-balancing loss (mixtures of experts only)
    router_z_coef: float = 0.0  # router z-loss (mixtures of experts only)
    loss_chunk: int = 0  # positions per chunk of the LM head + cross-entropy; 0: the whole logits at once
    progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}; choose 'constant' or 'cosine'")
        for name in ("num_steps", "grad_accum_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0 (0 computes the whole logits), got {self.loss_chunk}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


# ------------------------------------------------------------------------------------------------- masks
def _path_names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def make_mask(variables: Any, trainable: Callable[[tuple[str, ...]], bool]) -> Any:
    """A boolean tree: `trainable(path)` for each leaf, the path as a tuple of key names."""
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(trainable(_path_names(p))), variables)


def full_finetune_mask(variables: Any) -> Any:
    return make_mask(variables, lambda path: path[0] == "params")


def lora_mask(variables: Any) -> Any:
    return make_mask(variables, lambda path: path[0] == "lora")


def router_mask(variables: Any) -> Any:
    return make_mask(variables, lambda path: path[0] == "params" and "router" in path)


def partition(tree: Any, mask: Any) -> tuple[Any, Any]:
    """(trainable, frozen): the same tree twice, each with `optax.MaskedNode()` where the other has leaves."""
    trainable = jax.tree.map(lambda m, x: x if m else optax.MaskedNode(), mask, tree)
    frozen = jax.tree.map(lambda m, x: optax.MaskedNode() if m else x, mask, tree)
    return trainable, frozen


def join(trainable: Any, frozen: Any) -> Any:
    """Inverse of `partition`."""
    return jax.tree.map(
        lambda t, f: f if isinstance(t, optax.MaskedNode) else t, trainable, frozen,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )


def count_trainable(mask: Any, variables: Any) -> int:
    return int(sum(np.size(x) for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(variables), strict=True) if m))


# --------------------------------------------------------------------------------------------- optimizer
def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    if cfg.schedule == "constant":
        if cfg.warmup_steps:
            return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
        return optax.constant_schedule(cfg.learning_rate)
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, max(cfg.num_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: TrainConfig, mask: Any) -> optax.GradientTransformation:
    """AdamW (optionally after global-norm clipping), applied through `optax.masked` to trainable leaves."""
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.masked(optax.chain(*parts), mask)


# ------------------------------------------------------------------------------------------------ the step
@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    trainable: Any
    opt_state: Any
    rng: jax.Array  # uint32 raw key data; the step's key is fold_in(rng, step)


def token_cross_entropy(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(token_t | tokens_<t) over positions with loss_mask[t] = 1, number of such tokens).

    Computed on the whole [B, T, V] logits, the last position with weight 0, as logsumexp minus the target's
    logit picked by comparison: no [B, T-1, V] slice of the logits is copied and the backward pass is one
    elementwise softmax-minus-one-hot, not a scatter into a zeroed [B, T-1, V] buffer.
    """
    weights = jnp.pad(loss_mask[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    logits = logits.astype(jnp.float32)
    vocab_ids = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    target_logits = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
    return jnp.sum(jnp.where(weights > 0, nll, 0.0) * weights), jnp.sum(weights)


def _overlay(variables: dict) -> lora_lib.LoraAdapter | None:
    """Every LoRA adapter of the variables (trained or frozen), applied side by side, in key order."""
    adapters = [v for _, v in sorted(variables.items()) if isinstance(v, lora_lib.LoraAdapter)]
    return lora_lib.concatenate(adapters) if adapters else None


def _penalty(cfg: TrainConfig, variables: dict) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    for weight, term in cfg.penalties:
        total = total + weight * term(variables)
    return total


def make_gradients(
    model_cfg: LlamaConfig, cfg: TrainConfig
) -> Callable[[Any, Any, dict, jax.Array], tuple[Any, dict]]:
    """(trainable, frozen, batch, key) -> (gradients of the trainable tree, loss metrics).

    The gradient tree has the trainable tree's structure: leaves for trainable parameters only.
    """
    n_micro = cfg.grad_accum_steps

    def objective(trainable: Any, frozen: Any, batch: dict, key: jax.Array, denom: jax.Array) -> tuple:
        variables = join(trainable, frozen)
        adapter = _overlay(variables)
        use_dropout = adapter is not None and adapter.dropout > 0
        kwargs = dict(lora=adapter, segment_ids=batch.get("segment_ids"), positions=batch.get("positions"),
                      dropout_rng=key if use_dropout else None)
        params, tokens = variables["params"], batch["tokens"]
        router_loss = jnp.zeros((), jnp.float32)
        if cfg.loss_chunk:
            out = forward_hidden(model_cfg, params, tokens, **kwargs, with_aux=model_cfg.is_moe)
        else:
            out = (forward_with_aux if model_cfg.is_moe else forward)(model_cfg, params, tokens, **kwargs)
        out, aux = out if model_cfg.is_moe else (out, None)
        if aux is not None:
            real = batch["segment_ids"] > 0 if "segment_ids" in batch else None
            router_loss = cfg.router_aux_coef * load_balancing_loss(
                aux["router_logits"], model_cfg.num_experts_per_tok, real)
            if cfg.router_z_coef:
                router_loss = router_loss + cfg.router_z_coef * router_z_loss(aux["router_logits"], real)
        if cfg.loss_chunk:
            ce_sum, _ = chunked_token_cross_entropy(
                out, output_kernel(model_cfg, params), tokens, batch["loss_mask"], chunk=cfg.loss_chunk,
                precision=matmul_precision(model_cfg))
        else:
            ce_sum, _ = token_cross_entropy(out, tokens, batch["loss_mask"])
        return ce_sum / denom + router_loss / n_micro, (ce_sum, router_loss)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def gradients(trainable: Any, frozen: Any, batch: dict, key: jax.Array) -> tuple[Any, dict]:
        n_tokens = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))
        denom = jnp.maximum(n_tokens, 1.0)
        if n_micro == 1:
            (_, (ce_sum, router_loss)), grads = grad_fn(trainable, frozen, batch, key, denom)
        else:
            micro = jax.tree.map(lambda x: x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:]), batch)

            def accumulate(carry: Any, inputs: Any) -> tuple[Any, None]:
                index, mb = inputs
                (_, (ce, router)), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(key, index), denom)
                acc_g, acc_ce, acc_router = carry
                return (jax.tree.map(jnp.add, acc_g, g), acc_ce + ce, acc_router + router / n_micro), None

            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, ce_sum, router_loss), _ = jax.lax.scan(accumulate, init, (jnp.arange(n_micro), micro))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
        penalty, penalty_grads = jax.value_and_grad(lambda t: _penalty(cfg, join(t, frozen)))(trainable)
        grads = jax.tree.map(jnp.add, grads, penalty_grads)
        metrics = {"loss": ce_sum / denom, "penalty": penalty, "answer_tokens": n_tokens}
        if model_cfg.is_moe:
            metrics["router_loss"] = router_loss
        return grads, metrics

    return gradients


def make_step(
    model_cfg: LlamaConfig, cfg: TrainConfig, tx: optax.GradientTransformation
) -> Callable[[TrainState, Any, dict], tuple[TrainState, dict]]:
    """The (unjitted) training step: state, frozen tree, batch -> new state, metrics."""
    gradients = make_gradients(model_cfg, cfg)
    schedule = learning_rate_schedule(cfg)

    def step(state: TrainState, frozen: Any, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grads, metrics = gradients(state.trainable, frozen, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
        return TrainState(state.step + 1, trainable, opt_state, state.rng), metrics

    return step


def _step_settings(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the fields that do not change the compiled step set to fixed values (a cache key)."""
    return dataclasses.replace(cfg, seed=0, log_every=1, checkpoint_every=1, keep_checkpoints=1, progress=True)


def _tree_key(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


@functools.lru_cache(maxsize=32)
def _optimizer(cfg: TrainConfig, mask_key: tuple) -> optax.GradientTransformation:
    treedef, leaves = mask_key
    return make_optimizer(cfg, jax.tree.unflatten(treedef, leaves))


@functools.lru_cache(maxsize=32)
def _compiled(model_cfg: LlamaConfig, cfg: TrainConfig, mask_key: tuple, shardings_key: tuple) -> tuple:
    """(jitted optimizer init, jitted step), shared by every Trainer with the same settings and layout, so a
    run of many rounds compiles its step once per shape instead of once per round."""
    tx = _optimizer(cfg, mask_key)
    shardings: TrainState = jax.tree.unflatten(*shardings_key)
    init = jax.jit(tx.init, out_shardings=shardings.opt_state)
    step = jax.jit(make_step(model_cfg, cfg, tx), donate_argnums=(0,), out_shardings=(shardings, None))
    return init, step


# ------------------------------------------------------------------------------------------------ the loop
def _mesh_of(tree: Any) -> Mesh | None:
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def _place(tree: Any, mesh: Mesh) -> Any:
    """Arrays not yet on `mesh` are replicated onto it (sharded arrays keep their sharding)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(x: Any) -> Any:
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(put, tree)


def _data_state(batches: Any, consumed: int) -> dict:
    if hasattr(batches, "get_state"):
        return {"iterator": batches.get_state(), "batches_consumed": consumed}
    return {"batches_consumed": consumed}


def _restore_data_state(batches: Any, state: dict) -> None:
    if "iterator" in state and hasattr(batches, "set_state"):
        batches.set_state(state["iterator"])
        return
    for _ in range(int(state["batches_consumed"])):  # an iterator without state: replay to the position
        next(batches)


class Trainer:
    """Trains the leaves of `variables` selected by `mask`; checkpoints into `workdir` and resumes from it.

    variables: {"params": ..., optionally "lora": LoraAdapter, "frozen_lora": LoraAdapter, "a_bank": ...}.
    Parameters already sharded on a mesh keep their shardings; otherwise everything is placed on `mesh`
    (default: the mesh of the sharded parameters, or one device). The step donates its state, so the
    trainer works on a copy of the trainable leaves; `donate_variables=True` hands the caller's arrays
    over instead (no copy: for full fine-tuning of large models; the caller must not use them afterwards).
    """

    def __init__(
        self, model_cfg: LlamaConfig, cfg: TrainConfig, variables: dict, mask: Any, *,
        workdir: str | Path | None = None, mesh: Mesh | None = None, donate_variables: bool = False,
    ):
        self.model_cfg, self.cfg = model_cfg, cfg
        if not any(jax.tree.leaves(mask)):
            raise ValueError("the training mask selects no parameter: nothing would train")
        self.mesh = mesh or _mesh_of(variables) or single_device_mesh()
        variables = _place(variables, self.mesh)
        step_cfg, mask_key = _step_settings(cfg), _tree_key(mask)
        self.tx = _optimizer(step_cfg, mask_key)
        trainable, self.frozen = partition(variables, mask)
        if not donate_variables:
            trainable = jax.tree.map(lambda x: x.copy(), trainable)
        self.num_trainable = count_trainable(mask, variables)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, trainable), param_shardings,
            transform_non_params=lambda _: replicated,
        )
        self.state_shardings = TrainState(replicated, param_shardings, opt_shardings, replicated)
        init, self._step = _compiled(model_cfg, step_cfg, mask_key, _tree_key(self.state_shardings))
        rng = jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), replicated)
        step0 = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        self.state = TrainState(step0, trainable, init(trainable), rng)
        # orbax needs absolute paths; a relative workdir is relative to the current directory.
        self.workdir = Path(workdir).absolute() if workdir is not None else None
        self._manager: ocp.CheckpointManager | None = None
        self._resume_data: dict | None = None
        if self.workdir is not None:
            self._manager = ocp.CheckpointManager(
                self.workdir / "checkpoints",
                options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                                     cleanup_tmp_directories=True),
            )
            self._restore_latest()

    # -------------------------------------------------------------------------------------- checkpoints
    def _restore_latest(self) -> None:
        assert self._manager is not None
        step = self._manager.latest_step()
        if step is None:
            return
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                self.state, self.state_shardings)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        self.state = restored["state"]
        self._resume_data = restored["data"]
        logger.info("resumed from %s at step %d", self.workdir, step)

    def _save(self, step: int, batches: Any, consumed: int) -> None:
        if self._manager is None:
            return
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state), data=ocp.args.JsonSave(_data_state(batches, consumed))))

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def variables(self) -> dict:
        """The full variable tree (trained and frozen leaves) as of now."""
        return join(self.state.trainable, self.frozen)

    # --------------------------------------------------------------------------------------------- loop
    def fit(self, batches: Iterator[dict], num_steps: int | None = None, desc: str = "train") -> dict:
        """Train until `num_steps` (default: cfg.num_steps) optimizer steps in total; return the variables.

        `batches` yields host batches (the global batch, or this process's rows in a multi-process run).
        If it has `get_state`/`set_state` (grain iterators do), its position is checkpointed; otherwise a
        resumed run skips the batches already consumed.
        """
        cfg = self.cfg
        total = num_steps or cfg.num_steps
        start = self.step
        consumed = start
        if self._resume_data is not None:
            _restore_data_state(batches, self._resume_data)
            consumed = int(self._resume_data["batches_consumed"])
            self._resume_data = None
        if start >= total:
            return self.variables()
        metrics_file, writer = self._open_logs()
        pending: list[tuple[int, dict]] = []
        progress = tqdm(total=total, initial=start, desc=desc, unit="step", disable=not cfg.progress,
                        dynamic_ncols=True, leave=False)
        window_start, window_tokens = time.perf_counter(), 0
        try:
            for step in range(start + 1, total + 1):
                host_batch = next(batches)
                window_tokens += int(np.size(host_batch["tokens"])) * jax.process_count()
                batch = shard_batch(host_batch, self.mesh)
                consumed += 1
                self.state, metrics = self._step(self.state, self.frozen, batch)
                pending.append((step, metrics))
                progress.update(1)
                save_now = step % cfg.checkpoint_every == 0 or step == total
                if step % cfg.log_every == 0 or save_now:
                    rows = self._check(pending)
                    pending = []
                    rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    last = rows[-1]
                    last.update(tokens_per_second=rate)
                    self._log(metrics_file, writer, last)
                    progress.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{rate:,.0f}")
                    window_start, window_tokens = time.perf_counter(), 0
                if save_now:
                    self._save(step, batches, consumed)
        finally:
            progress.close()
            if self._manager is not None:
                self._manager.wait_until_finished()
            if metrics_file is not None:
                metrics_file.close()
            if writer is not None:
                writer.close()
        return self.variables()

    def _check(self, pending: list[tuple[int, dict]]) -> list[dict]:
        """Fetch the metrics of the steps since the last check; stop at the first non-finite loss."""
        host = jax.device_get([m for _, m in pending])
        rows = []
        for (step, _), m in zip(pending, host, strict=True):
            row = {"step": step, **{k: float(v) for k, v in m.items()}}
            if not math.isfinite(row["loss"]) or not math.isfinite(row["penalty"]):
                last = self._manager.latest_step() if self._manager is not None else None
                raise NonFiniteLossError(
                    f"loss became {row['loss']} (penalty {row['penalty']}) at step {step}; the last good"
                    f" checkpoint is {'step ' + str(last) if last is not None else 'none'}"
                    f"{' in ' + str(self.workdir / 'checkpoints') if last is not None else ''}"
                )
            rows.append(row)
        return rows

    def _open_logs(self) -> tuple[Any, Any]:
        if self.workdir is None or jax.process_index() != 0:
            return None, None
        self.workdir.mkdir(parents=True, exist_ok=True)
        from tensorboardX import SummaryWriter

        return (self.workdir / "metrics.jsonl").open("a"), SummaryWriter(str(self.workdir / "tensorboard"))

    @staticmethod
    def _log(metrics_file: Any, writer: Any, row: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        if writer is not None:
            for key, value in row.items():
                if key != "step":
                    writer.add_scalar(f"train/{key}", value, row["step"])

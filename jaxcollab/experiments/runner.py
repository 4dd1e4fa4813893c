"""The experiment runner: models as cached artifacts, fine-tuning, evaluation, and the score matrices.

Every model of an experiment is a `ModelHandle` whose `key` is a hash of how it is made (its start model,
its data, its method and hyperparameters, or the recipe of a merge). Strategies ask the `Runner` for
models; identical requests give the same key, so shared work is done once: round 1 of sequential FFT is
the FFT "ingredient" of task 1, and it is also round 1 of joint training and of replay.

On disk (the workdir):

    models/<key>/            trained full models (Hugging Face directories, via save_hf)
    adapters/<key>/          trained LoRA adapters (PEFT directories) and o-LoRA A banks
    runs/<key>/              orbax checkpoints and metrics of a training in progress
    scores/<key>.json        scores of a model per task (and its old-knowledge score)
    predictions/<key>/       generated answers per task (jsonl)
    strategies/<name>.json   the models of a strategy's rounds and the seconds each took

A finished artifact is never redone; an interrupted training resumes from its last checkpoint; a merge or
mixture is rebuilt from its ingredients when needed (only its scores are kept). Re-running the same
command after a crash therefore finishes the job with the same results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxcollab import data as data_lib
from jaxcollab import lora as lora_lib
from jaxcollab import model as model_lib
from jaxcollab import train as train_lib
from jaxcollab.atomic import atomic_file
from jaxcollab.evaluation.drift import relative_change
from jaxcollab.evaluation.evaluate import constant_answer_baseline, evaluate_task
from jaxcollab.evaluation.knowledge import summarize
from jaxcollab.evaluation.loglik import load_multiple_choice_jsonl, multiple_choice
from jaxcollab.evaluation.old_measures import KnownQuestions, evaluate_old_knowledge, known_questions
from jaxcollab.evaluation.stats import paired_difference_ci
from jaxcollab.experiments.config import TRACE_EPOCHS, ExperimentConfigError, is_pretrained, old_measures
from jaxcollab.pretrained import PretrainedSourceError, pretrained_directory

logger = logging.getLogger(__name__)


def content_key(label: str, spec: Any) -> str:
    """`label-<12 hex>`: a stable name for an artifact made by `spec` (JSON-serialisable)."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{label}-{digest}"


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The training data of one fine-tuning: one task, the union of tasks 1..j, or task j with replay."""

    kind: str  # task | joint | replay
    round: int  # 1-based: the task of this round (joint: tasks 1..round)
    w_hist: float = 0.0
    duplication: int = 1
    seed: int = 0

    @staticmethod
    def task(j: int) -> DataSpec:
        return DataSpec("task", j)

    @staticmethod
    def joint(j: int, duplication: int = 1, seed: int = 0) -> DataSpec:
        return DataSpec("task", 1) if j == 1 and duplication == 1 else DataSpec("joint", j, 0.0, duplication, seed)

    @staticmethod
    def replay(j: int, w_hist: float, seed: int = 0) -> DataSpec:
        return DataSpec("task", j) if j == 1 or w_hist == 0 else DataSpec("replay", j, w_hist, 1, seed)


@dataclasses.dataclass
class ModelHandle:
    """A model of the experiment: its key, config, and how to get its parameters (lazily).

    For a LoRA fine-tuning, `adapter_dir` holds the round's adapter and `start` the model it was trained
    on; its parameters are the start's with the adapter folded in.
    """

    key: str
    cfg: model_lib.LlamaConfig
    label: str
    build: Callable[[], dict]
    start: ModelHandle | None = None
    adapter_dir: Path | None = None


class Runner:
    """Owns the workdir, the data, the base model and the caches; strategies are built on it."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, *, dry_run: bool = False):
        """`dry_run`: asking for a model trains nothing; `plan` records what a run would train, resume, reuse
        or compute, with the steps and tokens of each training."""
        self.config = config
        self.workdir = Path(workdir)
        self.dry_run = dry_run
        self.plan: dict[str, dict] = {}  # artifact key -> what the run does with it (filled in every run)
        self.writer = jax.process_index() == 0
        self.mesh = self._make_mesh()
        self.model_dir, self.model_identity = self._resolve_pretrained() if is_pretrained(config) else (None, {})
        self.tokenizer = self._make_tokenizer()
        self.chat = config.data.chat_template == "auto" and self.tokenizer.has_chat_template
        self.tasks = [self._in_chat(t) for t in self._make_tasks()]
        old_task = self._old_task()
        self.old_task = self._in_chat(old_task) if old_task is not None else None
        self.old_mc = [(p, load_multiple_choice_jsonl(p)) for p in _split(config.eval.old_mc_files)]
        self._params_cache: OrderedDict[str, dict] = OrderedDict()
        self._examples: dict[int, list[dict]] = {}
        self._base: ModelHandle | None = None
        self._warned: set[str] = set()  # measures whose base score was reported to be at chance
        self.model_cfg = self._model_config()
        try:
            data_lib.check_fits_model(self.tokenizer, self.model_cfg.vocab_size, str(self.model_dir or "scratch"))
        except data_lib.TokenizerError as e:
            raise ExperimentConfigError(f"{e} (config.data.tokenizer={config.data.tokenizer!r}; auto uses the"
                                        " model's own)") from None

    # ----------------------------------------------------------------------------------------- set-up
    def _make_mesh(self) -> jax.sharding.Mesh:
        mesh_cfg = model_lib.MeshConfig(self.config.mesh.data, self.config.mesh.fsdp, self.config.mesh.tensor)
        sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
        devices = jax.devices() if -1 in sizes else jax.devices()[: int(np.prod(sizes))]
        return model_lib.make_mesh(mesh_cfg, devices)

    def _resolve_pretrained(self) -> tuple[Path, dict]:
        """(Hugging Face directory, identity) of config.model.path (`jaxcollab.pretrained`): a GGUF is converted
        once into models/ of the workdir, by the first process while the others wait."""
        try:
            directory, identity = pretrained_directory(self.config.model.path, self.workdir / "models",
                                                       convert=self.writer, progress=bool(self.config.progress))
        except PretrainedSourceError as e:
            raise ExperimentConfigError(f"config.model.path: {e}") from None
        if jax.process_count() > 1 and "sha256" in identity:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"convert:{directory}")
        return directory, identity

    def _make_tokenizer(self) -> data_lib.Tokenizer:
        name = str(self.config.data.tokenizer or "auto")
        if name == "bytes" or (name == "auto" and self.model_dir is None):
            return data_lib.ByteTokenizer()
        path = self.model_dir if name == "auto" else Path(name)
        if name == "auto" and not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise ExperimentConfigError(
                f"the model directory {path} has no tokenizer ({', '.join(_TOKENIZER_FILES)}); name its tokenizer"
                " directory with --config.data.tokenizer=DIR")
        return data_lib.HFTokenizer(path)

    def _in_chat(self, task: data_lib.Task) -> data_lib.Task:
        """`task` with its prompts in the tokenizer's chat template when config.data.chat_template applies."""
        return data_lib.with_chat_template(task, self.tokenizer.chat_prompt) if self.chat else task

    def _make_tasks(self) -> list[data_lib.Task]:
        d = self.config.data
        if d.kind == "synthetic":
            return data_lib.synthetic_tasks(d.num_rounds, d.synthetic_seed, d.facts_per_domain, d.test_template)[1:]
        names = _split(d.tasks) or list(data_lib.PAPER_TASK_ORDER)
        tasks = []
        for name in names:
            if name == "MetaMath":
                if not d.metamath_file:
                    raise ValueError("config.data.tasks includes MetaMath but config.data.metamath_file is empty;"
                                     " name a local MetaMathQA json/jsonl file (see third_party/README.md)")
                options: dict[str, Any] = {"root": d.trace_root, "train_file": d.metamath_file}
                if d.gsm8k_file:
                    options["gsm8k_file"] = d.gsm8k_file
                tasks.append(data_lib.get_task("MetaMath", **options))
            else:
                tasks.append(data_lib.get_task(name, root=d.trace_root, variant=d.trace_variant))
        return tasks

    def _old_task(self) -> data_lib.Task | None:
        name = self.config.eval.old_task
        if not name:
            return None
        if name.startswith("synthetic/"):
            d = self.config.data
            return data_lib.get_task(name, num_rounds=max(d.num_rounds, 1), seed=d.synthetic_seed,
                                     facts_per_domain=d.facts_per_domain, test_template=d.test_template)
        return data_lib.get_task(name, root=self.config.data.trace_root, variant=self.config.data.trace_variant)

    def _model_config(self) -> model_lib.LlamaConfig:
        m = self.config.model
        runtime = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy, moe_impl=m.moe_impl)
        if self.model_dir is not None:
            return model_lib.LlamaConfig.from_pretrained_dir(self.model_dir, **runtime)
        vocab = -(-self.tokenizer.vocab_size // 8) * 8  # rounded up so that the vocabulary shards evenly
        return model_lib.LlamaConfig(
            vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, rope_theta=m.rope_theta,
            max_position_embeddings=max(self.config.data.seq_len, self.config.eval.max_prompt_len) + 512,
            bos_token_id=self.tokenizer.bos_id, eos_token_id=self.tokenizer.eos_id,
            pad_token_id=self.tokenizer.pad_id, **runtime,
        )

    @property
    def num_rounds(self) -> int:
        return len(self.tasks)

    # -------------------------------------------------------------------------------------------- data
    def train_examples(self, j: int) -> list[dict]:
        """Training rows of the task of round j (1-based), limited by config.data.train_limit."""
        if j not in self._examples:
            rows = self.tasks[j - 1].examples("train")
            limit = self.config.data.train_limit
            self._examples[j] = rows[:limit] if limit else rows
        return self._examples[j]

    def examples(self, spec: DataSpec) -> list[dict]:
        if spec.kind == "task":
            return self.train_examples(spec.round)
        if spec.kind == "joint":
            sets = [self.train_examples(i) for i in range(1, spec.round + 1)]
            mixed = data_lib.joint_mixture(sets, duplication=spec.duplication, seed=spec.seed)
        else:
            earlier = [self.train_examples(i) for i in range(1, spec.round)]
            mixed = data_lib.replay_mixture(self.train_examples(spec.round), earlier, w_hist=spec.w_hist,
                                            seed=spec.seed + spec.round)
        return [{"prompt": p, "answer": a} for p, a in zip(mixed["prompt"], mixed["answer"], strict=True)]

    def _pipeline(self, examples: Sequence[dict], seed: int, num_epochs: int | None) -> data_lib.TrainPipeline:
        """Batches of this process's share of the rows (the global batch is split over processes)."""
        d = self.config.data
        processes = jax.process_count()
        return data_lib.build_train_pipeline(
            examples, self.tokenizer, seq_len=d.seq_len, batch_size=d.batch_size // processes, packing=d.packing,
            num_epochs=num_epochs, seed=seed, shard_index=jax.process_index(), shard_count=processes,
        )

    def _epoch_size(self, examples: Sequence[dict], seed: int) -> tuple[int, data_lib.TokenizationStats]:
        """(batches in one pass over `examples`, their tokenization counts)."""
        pipeline = self._pipeline(examples, seed, num_epochs=1)
        return sum(1 for _ in iter(pipeline)), pipeline.stats

    # ------------------------------------------------------------------------------------------ models
    def params(self, handle: ModelHandle) -> dict:
        """The parameters of a model (built or loaded on first use; the last few are kept in memory)."""
        if handle.key in self._params_cache:
            self._params_cache.move_to_end(handle.key)
            return self._params_cache[handle.key]
        params = handle.build()
        self._params_cache[handle.key] = params
        while len(self._params_cache) > 4:
            self._params_cache.popitem(last=False)
        return params

    def _claim_params(self, handle: ModelHandle) -> dict:
        """The parameters of `handle`, owned by the caller (out of the cache, which is emptied to free memory
        for a full fine-tuning that will consume them)."""
        params = self._params_cache.pop(handle.key, None)
        self._params_cache.clear()
        return params if params is not None else handle.build()

    def _load_full(self, path: Path) -> Callable[[], dict]:
        cfg = self.model_cfg

        def build() -> dict:
            return model_lib.load_hf(path, dtype=cfg.param_dtype, mesh=self.mesh, compute_dtype=cfg.dtype)[1]

        return build

    def base(self) -> ModelHandle:
        if self._base is not None:
            return self._base
        m = self.config.model
        if self.model_dir is not None:
            key = content_key("base", {**self.model_identity, "dtype": m.param_dtype})
            self._base = ModelHandle(key, self.model_cfg, "base", self._load_full(self.model_dir))
            return self._base
        spec = {"model": self.model_cfg.to_hf_dict(), "train": _training_settings(self.config.base_train),
                "old_task": self.config.eval.old_task, "data": _data_settings(self.config), "seed": self.config.seed}
        key = content_key("base", spec)
        path = self.workdir / "models" / key
        if not self._have(key, path / "config.json", "base", lambda: (self.old_task.examples("train"),
                                                                      self.config.base_train, None)):
            self._train_base(key, path)
        self._base = ModelHandle(key, self.model_cfg, "base (pre-trained here)", self._load_full(path))
        return self._base

    def _train_base(self, key: str, path: Path) -> None:
        assert self.old_task is not None
        logger.info("pre-training the base on %s", self.old_task.name)
        params = model_lib.init_params(self.model_cfg, jax.random.key(self.config.seed))
        params = model_lib.shard_params(self.model_cfg, params, self.mesh)
        examples = self.old_task.examples("train")
        variables = {"params": params}
        out = self._fit(key, variables, train_lib.full_finetune_mask(variables), examples, self.config.base_train,
                        section="base_train", desc="base", donate=True)
        self._save_full(out["params"], path)

    def fine_tune(self, start: ModelHandle, data: DataSpec, method: str, *, olora: dict | None = None,
                  label: str = "") -> ModelHandle:
        """The model made by training `start` on `data` with `method` (fft | lora | router).

        olora (LoRA only): {"lambda": λ, "lambda2": λ2, "mode": merged|frozen, "previous": [lora handles]}:
        the earlier rounds' adapters give the A bank; in frozen mode they also stay as frozen overlays.
        """
        methods = {"fft": self.config.fft, "lora": self.config.lora}
        if self.config.setting == "semi":
            methods["router"] = self.config.moe.router_train
        if method not in methods:
            raise ValueError(f"unknown fine-tuning method {method!r}; valid: {', '.join(methods)}")
        settings = methods[method]
        previous = list((olora or {}).get("previous", []))
        spec: dict[str, Any] = {"start": start.key, "data": dataclasses.asdict(data), "method": method,
                                "settings": _training_settings(settings), "seed": self.config.seed,
                                "data_settings": _data_settings(self.config)}
        if olora and previous:
            spec["olora"] = {"lambda": olora["lambda"], "lambda2": olora.get("lambda2", 0.0), "mode": olora["mode"],
                             "previous": [h.key for h in previous]}
        name = label or f"{method}-r{data.round}"
        key = content_key(name, spec)
        planned = lambda: (self.examples(data), settings, data)  # noqa: E731
        if method in ("fft", "router"):
            path = self.workdir / "models" / key
            if not self._have(key, path / "config.json", name, planned, method=method):
                self._train_full(key, path, start, data, method, settings)
            cfg = start.cfg
            return ModelHandle(key, cfg, name, self._load_full_like(path, cfg), start=start)
        adapter_dir = self.workdir / "adapters" / key
        if not self._have(key, adapter_dir / lora_lib.ADAPTER_CONFIG, name, planned, method=method):
            self._train_lora(key, adapter_dir, start, data, settings, olora if previous else None, previous)
        frozen_mode = bool(olora and previous and olora["mode"] == "frozen")

        def build() -> dict:
            adapter = self.adapter(adapter_dir)
            if frozen_mode:  # start is the base; every earlier adapter is applied too
                adapters = [self.adapter(h.adapter_dir) for h in previous] + [adapter]
                return lora_lib.fold(self.params(start), lora_lib.concatenate(adapters))
            return lora_lib.fold(self.params(start), adapter)

        return ModelHandle(key, start.cfg, name, build, start=start, adapter_dir=adapter_dir)

    def _load_full_like(self, path: Path, cfg: model_lib.LlamaConfig) -> Callable[[], dict]:
        def build() -> dict:
            return model_lib.load_hf(path, dtype=cfg.param_dtype, mesh=self.mesh, compute_dtype=cfg.dtype,
                                     moe_impl=cfg.moe_impl)[1]

        return build

    def derived(self, label: str, recipe: dict, cfg: model_lib.LlamaConfig, build: Callable[[], dict]) -> ModelHandle:
        """A model computed from others (a merge, a mixture): rebuilt when needed, never stored."""
        key = content_key(label, recipe)
        self.plan.setdefault(key, {"label": label, "action": "compute"})
        return ModelHandle(key, cfg, label, build)

    def _have(self, key: str, marker: Path, label: str, planned: Callable[[], tuple], method: str = "fft") -> bool:
        """Whether the artifact `key` can be used as it is (its `marker` file exists, or this is a dry run).

        Records in `plan` what the run does with it: reuse (made by an earlier run, said once), train or
        resume (a dry run also counts its steps and tokens; `planned` gives its examples, settings, data).
        """
        if marker.is_file():
            if key not in self.plan:
                self.plan[key] = {"label": label, "action": "reuse"}
                if not self.dry_run:
                    tqdm.write(f"reusing {label}: {marker.parent}")
            return True
        if key in self.plan:
            return self.dry_run
        resume = (self.workdir / "runs" / key / "checkpoints").is_dir()
        entry = {"label": label, "action": "resume" if resume else "train", "method": method}
        if self.dry_run:
            examples, settings, data = planned()
            epochs, batches, steps, stats = self._schedule(examples, settings, data)
            entry.update(steps=steps, epochs=epochs, examples=len(examples), tokens_per_epoch=stats.num_tokens)
        self.plan[key] = entry
        return self.dry_run

    def adapter(self, adapter_dir: Path) -> lora_lib.LoraAdapter:
        adapter, _ = lora_lib.load_peft(adapter_dir, self.model_cfg, params=self.params(self.base()))
        return adapter

    def lora_config(self) -> lora_lib.LoraConfig:
        c = self.config.lora
        return lora_lib.LoraConfig(rank=c.rank, alpha=c.alpha, dropout=c.dropout,
                                   target_modules=tuple(_split(c.target_modules)), use_rslora=c.use_rslora)

    # ---------------------------------------------------------------------------------------- training
    def _train_config(self, settings: ml_collections.ConfigDict, num_steps: int, **extra: Any) -> train_lib.TrainConfig:
        return train_lib.TrainConfig(
            learning_rate=settings.learning_rate, schedule=settings.schedule, warmup_steps=settings.warmup_steps,
            min_lr_ratio=settings.min_lr_ratio, num_steps=num_steps, weight_decay=settings.weight_decay,
            max_grad_norm=settings.max_grad_norm or None, grad_accum_steps=settings.grad_accum_steps,
            seed=self.config.seed, log_every=max(1, min(50, num_steps // 4)),
            checkpoint_every=settings.checkpoint_every, keep_checkpoints=2, progress=bool(self.config.progress),
            loss_chunk=self.config.model.loss_chunk, **extra,
        )

    def _epochs(self, settings: ml_collections.ConfigDict, data: DataSpec | None) -> float:
        if settings.epochs > 0 or data is None:
            return float(settings.epochs)
        return float(TRACE_EPOCHS.get(self.tasks[data.round - 1].name, 1))

    def _schedule(self, examples: Sequence[dict], settings: ml_collections.ConfigDict,
                  data: DataSpec | None) -> tuple[float, int, int, data_lib.TokenizationStats]:
        """(epochs, batches per epoch, steps, tokenization counts of one epoch) of a training."""
        epochs = self._epochs(settings, data)
        batches, stats = self._epoch_size(examples, self.config.seed + (data.round if data else 0))
        return epochs, batches, max(1, round(epochs * max(batches, 1))), stats

    def _fit(self, key: str, variables: dict, mask: Any, examples: Sequence[dict],
             settings: ml_collections.ConfigDict, *, section: str, data: DataSpec | None = None, desc: str = "",
             cfg: model_lib.LlamaConfig | None = None, donate: bool = False, **extra: Any) -> dict:
        seed = self.config.seed + (data.round if data else 0)
        epochs, batches, steps, stats = self._schedule(examples, settings, data)
        if settings.warmup_steps and settings.warmup_steps >= steps:
            raise ExperimentConfigError(
                f"config.{section}.warmup_steps={settings.warmup_steps} but {desc or key} has only {steps} steps:"
                " the learning rate would never leave the warm-up (the first step runs at lr 0); lower it")
        trainable = sum(int(np.prod(leaf.shape)) for leaf, train in zip(
            jax.tree.leaves(variables), jax.tree.leaves(mask), strict=True) if train)
        schedule = (f"{settings.schedule} lr {settings.learning_rate:g}"
                    + (f" after {settings.warmup_steps} warm-up steps" if settings.warmup_steps else ""))
        tqdm.write(f"training {desc or key}: {steps} steps ({epochs:g} epochs of {len(examples)} examples,"
                   f" {batches} batches of {self.config.data.batch_size} x {self.config.data.seq_len}; "
                   f"{stats.num_tokens} tokens, {stats.num_loss_tokens} scored, per epoch), {schedule},"
                   f" {trainable:,} trainable parameters")
        run_dir = self.workdir / "runs" / key
        trainer = train_lib.Trainer(cfg or self.model_cfg, self._train_config(settings, steps, **extra), variables,
                                    mask, workdir=run_dir, mesh=self.mesh, donate_variables=donate)
        out = trainer.fit(iter(self._pipeline(examples, seed, num_epochs=None)), desc=desc or key)
        return out

    def _done_with_run(self, key: str) -> None:
        if not self.config.keep_checkpoints and self.writer:
            shutil.rmtree(self.workdir / "runs" / key / "checkpoints", ignore_errors=True)

    def _save_full(self, params: dict, path: Path, cfg: model_lib.LlamaConfig | None = None) -> None:
        model_lib.save_hf(cfg or self.model_cfg, params, path, overwrite=True)

    def _train_full(self, key: str, path: Path, start: ModelHandle, data: DataSpec, method: str,
                    settings: ml_collections.ConfigDict) -> None:
        variables = {"params": self._claim_params(start)}  # trained in place: no second copy of the model
        if method == "router":
            mask = train_lib.router_mask(variables)
            extra = {"router_aux_coef": self.config.moe.router_aux_coef}
        else:
            mask = train_lib.full_finetune_mask(variables)
            extra = {}
        section = "moe.router_train" if method == "router" else "fft"
        out = self._fit(key, variables, mask, self.examples(data), settings, section=section, data=data, desc=key,
                        cfg=start.cfg, donate=True, **extra)
        self._save_full(out["params"], path, start.cfg)
        self._done_with_run(key)

    def _train_lora(self, key: str, adapter_dir: Path, start: ModelHandle, data: DataSpec,
                    settings: ml_collections.ConfigDict, olora: dict | None, previous: list[ModelHandle]) -> None:
        lcfg = self.lora_config()
        frozen_mode = bool(olora and olora["mode"] == "frozen")
        start_params = self.params(self.base() if frozen_mode else start)
        init_key = jax.random.fold_in(jax.random.key(self.config.seed), data.round)
        variables: dict[str, Any] = {"params": start_params,
                                     "lora": lora_lib.init(lcfg, self.model_cfg, start_params, init_key)}
        extra: dict[str, Any] = {}
        bank = None
        if olora:
            earlier = [self.adapter(h.adapter_dir) for h in previous]
            for adapter in earlier:
                bank = lora_lib.extend_a_bank(bank, adapter)
            variables[lora_lib.A_BANK] = bank
            if frozen_mode:
                variables["frozen_lora"] = lora_lib.concatenate(earlier)  # applied with the trained one
            extra = {"penalties": lora_lib.olora_penalties(olora["lambda"], olora.get("lambda2", 0.0))}
        out = self._fit(key, variables, train_lib.lora_mask(variables), self.examples(data), settings,
                        section="lora", data=data, desc=key, **extra)
        if self.writer:
            lora_lib.save_peft(out["lora"], lcfg, adapter_dir, overwrite=True)
            if olora is not None or previous:
                lora_lib.save_a_bank(lora_lib.extend_a_bank(bank, out["lora"]),
                                     adapter_dir / lora_lib.A_BANK_FILE)
        self._done_with_run(key)

    # -------------------------------------------------------------------------------------- evaluation
    def _scores_path(self, handle: ModelHandle) -> Path:
        return self.workdir / "scores" / f"{handle.key}.json"

    def _read_scores(self, handle: ModelHandle) -> dict:
        path = self._scores_path(handle)
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_scores(self, handle: ModelHandle, scores: dict) -> None:
        if self.writer:
            with atomic_file(self._scores_path(handle)) as tmp:
                tmp.write_text(json.dumps(scores, indent=1, sort_keys=True))

    def score(self, handle: ModelHandle, task: data_lib.Task) -> float:
        """Score of a model on a task's evaluation split (cached per model and task)."""
        scores = self._read_scores(handle)
        if task.name in scores:
            return scores[task.name]
        e = self.config.eval
        result = evaluate_task(handle.cfg, self.params(handle), task, self.tokenizer, split=e.split,
                               limit=e.limit or None, max_prompt_len=e.max_prompt_len, batch_size=e.batch_size)
        if self.writer:
            path = self.workdir / "predictions" / handle.key / f"{task.name.replace('/', '_')}.jsonl"
            with atomic_file(path) as tmp:
                tmp.write_text("".join(json.dumps({"prediction": p, "reference": r}) + "\n"
                                       for p, r in zip(result.predictions, result.references, strict=True)))
        scores = {**self._read_scores(handle), task.name: result.score, _items_key(task.name): result.items}
        self._write_scores(handle, scores)
        return result.score

    def constant_answer(self, j: int) -> dict:
        """Round j's task answered without a model (`constant_answer_baseline`) on the rows `score` uses: the
        score a trained model must beat to have learned more than one fixed answer (say the majority class)."""
        e = self.config.eval
        result = constant_answer_baseline(self.tasks[j - 1], self.train_examples(j), split=e.split,
                                          limit=e.limit or None)
        return {"task": result.task, "answer": result.predictions[0], "score": result.score, "items": result.items}

    def score_items(self, handle: ModelHandle, task: data_lib.Task) -> list[float] | None:
        """The per-example metric values behind `score(handle, task)` (None for scores cached without them)."""
        self.score(handle, task)
        return self._read_scores(handle).get(_items_key(task.name))

    def old_score(self, handle: ModelHandle) -> float | None:
        """Mean over the legacy old-knowledge suite (the old task and the multiple-choice files); None if empty."""
        values = []
        if self.old_task is not None:
            values.append(self.score(handle, self.old_task))
        for path, rows in self.old_mc:
            name = f"mc:{Path(path).name}"
            scores = self._read_scores(handle)
            if name not in scores:
                scores[name] = multiple_choice(handle.cfg, self.params(handle), self.tokenizer, rows)["acc_norm"]
                self._write_scores(handle, {**self._read_scores(handle), name: scores[name]})
            values.append(scores[name])
        return float(np.mean(values)) if values else None

    def old_measure(self, handle: ModelHandle, name: str) -> dict:
        """One old-knowledge measure of a model (eval.old), cached per model and measure settings: value, ci95,
        n, chance, per_item (one value per question or document, in a fixed order) and details."""
        e = self.config.eval
        size = int({"mmlu_text": e.old_text_size, "mmlu_known": e.old_known_pool}.get(name, e.old_size))
        source = str(e.old_source or "") or None
        cache_key = f"old:{name}:size={size}:seed={e.old_seed}:source={source or 'asset'}"
        known = None
        if name == "mmlu_known":
            cache_key += f":margin={float(e.old_known_margin)}"
            known = self._known_positions(size, source)
        scores = self._read_scores(handle)
        if cache_key in scores:
            return scores[cache_key]
        result = evaluate_old_knowledge(name, handle.cfg, self.params(handle), self.tokenizer, size=size,
                                        seed=int(e.old_seed), source=source, batch_size=int(e.score_batch_size),
                                        progress=bool(self.config.progress), known=known,
                                        known_margin=float(e.old_known_margin))
        record = {"value": result.value, "ci95": list(result.ci95), "n": result.n, "chance": result.chance,
                  "per_item": list(result.per_item), "details": result.details}
        self._write_scores(handle, {**self._read_scores(handle), cache_key: record})
        return record

    def _known_positions(self, pool_size: int, source: str | None) -> tuple[int, ...]:
        """mmlu_known's questions: those of the pool the base answers with eval.old_known_margin, selected once
        (cached with the base's scores). Refused when the base's confident answers are no better than chance."""
        e = self.config.eval
        base = self.base()
        margin = float(e.old_known_margin)
        cache_key = f"known:pool={pool_size}:seed={e.old_seed}:source={source or 'asset'}:margin={margin}"
        scores = self._read_scores(base)
        if cache_key not in scores:
            selection = known_questions(base.cfg, self.params(base), self.tokenizer, size=pool_size,
                                        seed=int(e.old_seed), margin=margin, source=source,
                                        batch_size=int(e.score_batch_size), progress=bool(self.config.progress))
            scores[cache_key] = dataclasses.asdict(selection)
            self._write_scores(base, {**self._read_scores(base), cache_key: scores[cache_key]})
        cached = scores[cache_key]
        selection = KnownQuestions(cached["pool_size"], cached["margin"], tuple(cached["positions"]),
                                   tuple(cached["margins"]), cached["confident"])
        if not selection.informative:
            raise ExperimentConfigError(
                f"eval.old names mmlu_known, but the base's MMLU answers are not knowledge: {selection.describe()}."
                " Whether a model keeps them would measure drift, not what the base knew. Drop mmlu_known from"
                " config.eval.old (mmlu_text measures this base), or raise config.eval.old_known_pool /"
                " config.eval.old_known_margin")
        return selection.positions

    def weight_change(self, handle: ModelHandle, reference: ModelHandle) -> float | None:
        """||W - W_ref|| / ||W_ref|| over all parameters (None for a mixture of experts: other shapes)."""
        if handle.cfg.is_moe or reference.cfg.is_moe:
            return None
        cache_key = f"weights:relative_change:{reference.key}"
        scores = self._read_scores(handle)
        if cache_key not in scores:
            reference_params = self.params(reference)
            value = relative_change(self.params(handle), reference_params)
            self._write_scores(handle, {**self._read_scores(handle), cache_key: value})
            return value
        return scores[cache_key]

    # --------------------------------------------------------------------------------------- strategies
    def run_strategy(self, name: str, model_for_round: Callable[[int], ModelHandle],
                     on_round: Callable[[int], None] | None = None) -> dict:
        """Evaluate a strategy round by round; its R matrix, old scores, derived measures and seconds."""
        record_path = self.workdir / "strategies" / f"{name}.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {"rounds": {}}
        n = self.num_rounds
        base = self.base()
        measure_names = old_measures(self.config)
        rows = [[self.score(base, t) for t in self.tasks]]
        items = [[self.score_items(base, t) for t in self.tasks]]
        legacy_old = [self.old_score(base)]
        old_records = {m: [self.old_measure(base, m)] for m in measure_names}
        for m, (base_score,) in old_records.items():
            if base_score["chance"] is not None and not base_score["ci95"][0] > base_score["chance"] \
                    and m not in self._warned:
                self._warned.add(m)
                logger.warning("old-knowledge measure %s: the base scores %.4f [%.4f, %.4f], not above chance (%.4g)"
                               " beyond its interval, so its changes cannot show forgetting of what the base knew",
                               m, base_score["value"], *base_score["ci95"], base_score["chance"])
        changes: dict[str, list[float | None]] = {"from_base": [], "update": []}
        for j in range(1, n + 1):
            start = time.perf_counter()
            handle = model_for_round(j)
            visible = self.tasks if self.config.eval.later_tasks else self.tasks[:j]
            row = [self.score(handle, t) for t in visible] + [math.nan] * (n - len(visible))
            rows.append(row)
            items.append([self.score_items(handle, t) for t in visible] + [None] * (n - len(visible)))
            legacy_old.append(self.old_score(handle))
            for m in measure_names:
                old_records[m].append(self.old_measure(handle, m))
            changes["from_base"].append(self.weight_change(handle, base))
            changes["update"].append(self.weight_change(handle, handle.start) if handle.start is not None else None)
            if record["rounds"].get(str(j), {}).get("model") != handle.key:
                record["rounds"][str(j)] = {"model": handle.key, "seconds": time.perf_counter() - start}
                if self.writer:
                    with atomic_file(record_path) as tmp:
                        tmp.write_text(json.dumps(record, indent=1))
            if on_round is not None:
                on_round(j)
        R = np.asarray(rows, dtype=np.float64)
        measures_out = {m: _old_measure_summary(records) for m, records in old_records.items()}
        if measure_names:
            old = list(measures_out[measure_names[0]]["value"])
        else:
            old = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in legacy_old]
        old_vector = None if all(v is None for v in old) else [math.nan if v is None else v for v in old]
        measures = summarize(R, old_vector)
        out = {
            "R": _json_matrix(R),
            "R_items": items,
            "old": old,
            "new": measures["new"], "recent": measures["recent"], "op": measures["op"], "bwt": measures["bwt"],
            "models": [record["rounds"][str(j)]["model"] for j in range(1, n + 1)],
            "seconds": float(sum(r["seconds"] for r in record["rounds"].values())),
            "weight_change": changes,
        }
        if measure_names:
            out["old_ci95"] = measures_out[measure_names[0]]["ci95"]
            out["old_measures"] = measures_out
        return out


def _old_measure_summary(records: list[dict]) -> dict:
    """One measure over the rows (base first): values, intervals, and each row's paired change from the base
    (the mean per-item difference and its t interval; `forgetting` when the interval lies below zero)."""
    base = records[0]
    change, change_ci = [0.0], [None]
    for record in records[1:]:
        if len(record["per_item"]) == len(base["per_item"]) and len(base["per_item"]) > 1:
            differences = np.asarray(record["per_item"], np.float64) - np.asarray(base["per_item"], np.float64)
            change.append(float(differences.mean()))
            change_ci.append(list(paired_difference_ci(record["per_item"], base["per_item"])))
        else:
            change.append(record["value"] - base["value"])
            change_ci.append(None)
    return {
        "value": [r["value"] for r in records],
        "ci95": [list(r["ci95"]) for r in records],
        "n": base["n"],
        "chance": base["chance"],
        "change": change,
        "change_ci95": change_ci,
        "forgetting": [ci is not None and ci[1] < 0 for ci in change_ci],
        "base_above_chance": None if base["chance"] is None else base["ci95"][0] > base["chance"],
        "per_item": [list(r["per_item"]) for r in records],
    }


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _items_key(task_name: str) -> str:
    return f"{task_name}#items"


def _split(text: str) -> list[str]:
    return [part.strip() for part in str(text or "").split(",") if part.strip()]


def _data_settings(config: ml_collections.ConfigDict) -> dict:
    """The data settings that change what a training sees (part of every training's key)."""
    d = config.data
    return {"kind": d.kind, "num_rounds": d.num_rounds, "facts": d.facts_per_domain, "synthetic_seed": d.synthetic_seed,
            "trace_variant": d.trace_variant, "tasks": d.tasks, "train_limit": d.train_limit, "tokenizer": d.tokenizer,
            "seq_len": d.seq_len, "batch_size": d.batch_size, "packing": d.packing, "test_template": d.test_template,
            "chat_template": d.chat_template}


def _training_settings(settings: ml_collections.ConfigDict) -> dict:
    """Settings that change a training's result (checkpoint frequency does not): part of its key."""
    return {k: v for k, v in settings.to_dict().items() if k != "checkpoint_every"}


def _json_matrix(R: np.ndarray) -> list[list[float | None]]:
    return [[None if math.isnan(v) else float(v) for v in row] for row in R]

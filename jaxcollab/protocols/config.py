"""Experiment configurations: one ml_collections ConfigDict per setting and variant, and their validation.

`experiment_config(setting, variant)` builds the config that `configs/semi.py` and `configs/full.py`
return. Variants:

- `embedded` (default): a tiny Llama (about 0.7M parameters, byte-level tokenizer) pre-trained from
  scratch on the synthetic "old" domain (the base, cached in the workdir), then four synthetic knowledge
  rounds. No downloads; runs on a laptop CPU in minutes.
- `tiny_trace`: a tiny model on the real TRACE files (`data.trace_root`), a few examples per task and a
  few steps: a smoke test of the whole pipeline on real data, not a quality run.
- `llama3_8b_trace`: the paper's setting: a local Hugging Face Llama 3 8B directory (`model.path`), the
  TRACE tasks in the paper's order from `data.trace_root` plus MetaMathQA (`data.metamath_file`), AdamW
  lr 2e-5 constant, effective batch 64, TRACE's per-task epochs, bf16, a mesh for a TPU slice or GPU node.

Every field is documented where it is defined below. Unknown keys are refused by the launcher with the
list of valid ones; `validate(config)` checks values that cannot be typed (strategy names, paths).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from jaxcollab.data.tasks import PAPER_TASK_ORDER

VARIANTS = ("embedded", "tiny_trace", "llama3_8b_trace")
SETTINGS = ("semi", "full")
SEMI_STRATEGIES = ("seq_fft", "seq_lora", "olora", "avg_fft", "avg_lora", "ties_lora", "dare_ties_lora",
                   "moe_gateless", "moe_noisy", "moe_router")
FULL_STRATEGIES = ("joint_fft", "joint_lora", "replay_fft", "replay_lora")
DEFAULT_STRATEGIES = {
    "semi": ",".join(s for s in SEMI_STRATEGIES if s != "moe_router"),
    "full": ",".join(FULL_STRATEGIES),
}
# Per-task epochs of TRACE's training scripts (C-STANCE 5, FOMC 3, MeetingBank 7, Py150 5, ScienceQA 3,
# NumGLUE-cm 5, NumGLUE-ds 5, 20Minuten 7); MetaMathQA (395k rows) is trained for one epoch.
TRACE_EPOCHS = {"C-STANCE": 5, "FOMC": 3, "MeetingBank": 7, "Py150": 5, "ScienceQA": 3, "NumGLUE-cm": 5,
                "NumGLUE-ds": 5, "20Minuten": 7, "MetaMath": 1}


class ExperimentConfigError(ValueError):
    """A config value that cannot run: the message names the key and what would be valid."""


def _train(learning_rate: float, **overrides: Any) -> ml_collections.ConfigDict:
    """Optimizer and loop settings of one kind of training (see jaxcollab.train.TrainConfig)."""
    c = ml_collections.ConfigDict()
    c.learning_rate = learning_rate
    c.schedule = "constant"  # constant | cosine
    c.warmup_steps = 0
    c.min_lr_ratio = 0.0
    c.weight_decay = 0.0
    c.max_grad_norm = 1.0
    c.grad_accum_steps = 1
    c.epochs = 1.0  # passes over the round's data (joint and replay rounds see more data, so more steps)
    c.checkpoint_every = 200
    c.update(overrides)
    return c


def experiment_config(setting: str, variant: str | None = None) -> ml_collections.ConfigDict:
    variant = variant or "embedded"
    if setting not in SETTINGS:
        raise ExperimentConfigError(f"setting={setting!r}; valid settings: {', '.join(SETTINGS)}")
    if variant not in VARIANTS:
        raise ExperimentConfigError(f"unknown config variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.setting = setting
    c.variant = variant
    c.seed = 0
    c.strategies = DEFAULT_STRATEGIES[setting]  # comma-separated; see SEMI_STRATEGIES / FULL_STRATEGIES

    # The model: "scratch" builds a tiny Llama and pre-trains it on data.old_task (cached in the workdir);
    # "hf" loads a Hugging Face Llama directory.
    c.model = ml_collections.ConfigDict()
    c.model.source = "scratch"  # scratch | hf
    c.model.path = ""  # HF directory (source=hf)
    c.model.hidden_size = 128
    c.model.intermediate_size = 256
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.rope_theta = 10000.0
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"  # storage dtype
    c.model.remat_policy = "none"
    c.model.loss_chunk = 0  # training: positions per chunk of the LM head + loss (0: whole [B, T, V] logits)

    # Pre-training of a scratch base on the old-knowledge task.
    c.base_train = _train(3e-3, schedule="cosine", warmup_steps=10, epochs=110.0)

    # Data: the tasks of the rounds, the old-knowledge suite, tokenizer and batch shapes.
    c.data = ml_collections.ConfigDict()
    c.data.kind = "synthetic"  # synthetic | trace
    c.data.num_rounds = 4  # synthetic: number of rounds (domains after the old one)
    c.data.facts_per_domain = 64
    c.data.synthetic_seed = 0
    c.data.trace_root = ""  # trace: the TRACE root (or env JAXCOLLAB_TRACE_ROOT)
    c.data.trace_variant = "trace500"
    c.data.tasks = ""  # trace: comma-separated task order (default: the paper's)
    c.data.metamath_file = ""  # trace: local MetaMathQA json/jsonl (the MetaMath round needs it)
    c.data.gsm8k_file = ""  # trace: GSM8K test jsonl (default: found under trace_root)
    c.data.train_limit = 0  # >0: use only the first N training rows of each task
    c.data.tokenizer = "bytes"  # bytes | an HF tokenizer directory ("" = model.path)
    c.data.seq_len = 128
    c.data.batch_size = 8  # global batch (sequences per step, before gradient accumulation splits it)
    c.data.packing = True

    # Evaluation after each round.
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"
    c.eval.limit = 0  # >0: first N test rows of each task
    c.eval.later_tasks = False  # also score tasks of later rounds (fills R above the diagonal)
    c.eval.max_prompt_len = 512
    c.eval.batch_size = 64
    c.eval.old_task = "synthetic/old"  # a generation task measuring old knowledge ("" for none)
    c.eval.old_mc_files = ""  # comma-separated multiple-choice jsonl suites (acc_norm) for old knowledge

    # Full fine-tuning and LoRA.
    c.fft = _train(3e-3, schedule="cosine", warmup_steps=5, epochs=25.0)
    c.lora = _train(1e-2, schedule="cosine", warmup_steps=5, epochs=25.0)
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.target_modules = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    c.lora.use_rslora = False

    if setting == "semi":
        c.olora = ml_collections.ConfigDict()
        c.olora.lambdas = "0.1"  # comma-separated: one strategy per value (olora_<λ>) when several
        c.olora.lambda2 = 0.0  # O-LoRA's weight on ||new factors||_2 (frozen mode)
        c.olora.mode = "merged"  # merged (the paper) | frozen (original O-LoRA)
        c.merge = ml_collections.ConfigDict()
        c.merge.density = 0.2
        c.merge.seed = 0
        c.moe = ml_collections.ConfigDict()
        c.moe.top_k = 2
        c.moe.noise_std = 0.02
        c.moe.router_train = _train(1e-3, epochs=5.0)
        c.moe.router_aux_coef = 0.1
    else:
        c.replay = ml_collections.ConfigDict()
        c.replay.w_hist = 0.1
        c.joint = ml_collections.ConfigDict()
        c.joint.duplication = 1

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.keep_checkpoints = False  # keep orbax checkpoints of finished trainings (they are deleted otherwise)
    c.progress = True

    if variant == "tiny_trace":
        c.data.kind = "trace"
        c.data.trace_root = os.environ.get("JAXCOLLAB_TRACE_ROOT", "")
        c.data.tasks = "C-STANCE,FOMC,Py150"
        c.data.train_limit = 16
        c.data.seq_len = 256
        c.eval.limit = 8
        c.base_train.epochs = 2.0
        c.base_train.learning_rate = 1e-3
        c.fft.epochs = 1.0
        c.lora.epochs = 1.0
        c.model.hidden_size = 64
        c.model.intermediate_size = 128
        c.model.num_layers = 2
    elif variant == "llama3_8b_trace":
        c.model.source = "hf"
        c.model.path = os.environ.get("JAXCOLLAB_LLAMA3_PATH", "")
        c.model.dtype = "bfloat16"
        c.model.param_dtype = "bfloat16"
        c.model.remat_policy = "dots_no_batch"
        c.model.loss_chunk = 256  # [B, 256, 128256] float32 logits at a time instead of [B, 2048, 128256]
        c.data.kind = "trace"
        c.data.trace_root = os.environ.get("JAXCOLLAB_TRACE_ROOT", "")
        c.data.tasks = ",".join(PAPER_TASK_ORDER)
        c.data.tokenizer = ""
        c.data.seq_len = 2048
        c.data.batch_size = 64
        c.eval.max_prompt_len = 1536
        c.eval.batch_size = 32
        c.eval.old_task = ""
        for section in (c.fft, c.lora):
            section.learning_rate = 2e-5
            section.schedule = "constant"
            section.warmup_steps = 0
            section.epochs = 0.0  # 0: TRACE's per-task epochs (TRACE_EPOCHS)
            section.checkpoint_every = 500
        c.lora.rank = 16
        c.lora.alpha = 32.0
        if setting == "semi":
            c.moe.router_train.epochs = 1.0
    return c


def strategy_names(config: ml_collections.ConfigDict) -> list[str]:
    """The strategies to run, in order, with o-LoRA expanded to one per λ when several are given."""
    valid = SEMI_STRATEGIES if config.setting == "semi" else FULL_STRATEGIES
    names = [s.strip() for s in str(config.strategies).split(",") if s.strip()]
    if not names:
        raise ExperimentConfigError(f"config.strategies is empty; valid strategies: {', '.join(valid)}")
    unknown = [n for n in names if n not in valid and not n.startswith("olora_")]
    if unknown:
        raise ExperimentConfigError(
            f"config.strategies: unknown strategy {unknown[0]!r} for the {config.setting} setting; valid"
            f" strategies: {', '.join(valid)}"
        )
    out = []
    for name in names:
        if name == "olora" and len(olora_lambdas(config)) > 1:
            out.extend(f"olora_{lam:g}" for lam in olora_lambdas(config))
        else:
            out.append(name)
    return out


def olora_lambdas(config: ml_collections.ConfigDict) -> list[float]:
    try:
        values = [float(v) for v in str(config.olora.lambdas).split(",") if v.strip()]
    except ValueError:
        raise ExperimentConfigError(
            f"config.olora.lambdas={config.olora.lambdas!r}: give numbers, e.g. 0.1,0.5") from None
    if not values:
        raise ExperimentConfigError("config.olora.lambdas is empty; give at least one value, e.g. 0.1")
    return values


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks that need no model: strategy names, sources, and paths the variant requires."""
    strategy_names(config)
    if config.setting == "semi":
        olora_lambdas(config)
        if config.olora.mode not in ("merged", "frozen"):
            raise ExperimentConfigError(f"config.olora.mode={config.olora.mode!r}; valid: merged, frozen")
        if not 0.0 < config.merge.density <= 1.0:
            raise ExperimentConfigError(f"config.merge.density={config.merge.density} must be in (0, 1]")
    if config.model.source not in ("scratch", "hf"):
        raise ExperimentConfigError(f"config.model.source={config.model.source!r}; valid: scratch, hf")
    if config.model.source == "hf" and not os.path.isdir(config.model.path or ""):
        raise ExperimentConfigError(
            f"config.model.path={config.model.path!r} is not a directory; the {config.variant} variant needs a"
            " local Hugging Face Llama directory (set --config.model.path or JAXCOLLAB_LLAMA3_PATH)"
        )
    if config.model.loss_chunk < 0:
        raise ExperimentConfigError(
            f"config.model.loss_chunk={config.model.loss_chunk} must be >= 0 (0 computes the whole logits)")
    if config.data.kind not in ("synthetic", "trace"):
        raise ExperimentConfigError(f"config.data.kind={config.data.kind!r}; valid: synthetic, trace")
    if config.data.kind == "trace" and not os.path.isdir(config.data.trace_root or ""):
        raise ExperimentConfigError(
            f"config.data.trace_root={config.data.trace_root!r} is not a directory; the {config.variant} variant"
            " needs the TRACE data (set --config.data.trace_root or JAXCOLLAB_TRACE_ROOT; see third_party/README.md)"
        )
    if config.data.kind == "synthetic" and config.data.num_rounds < 1:
        raise ExperimentConfigError(f"config.data.num_rounds={config.data.num_rounds} must be at least 1")
    if config.model.source == "scratch" and not config.eval.old_task:
        raise ExperimentConfigError("config.eval.old_task is empty, but a scratch base (config.model.source)"
                                    " is pre-trained on it; name a task such as synthetic/old")
    if config.setting == "full" and config.replay.w_hist < 0:
        raise ExperimentConfigError(f"config.replay.w_hist={config.replay.w_hist} must be >= 0")

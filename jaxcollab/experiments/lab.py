"""What a strategy works with: the narrow `Lab` a strategy function `(lab, j) -> ModelHandle` is given.

A strategy asks for models, never for files or caches: the base, a training of a start model on some data
with a method, and models computed from others (an average, a merge of LoRA adapters, a mixture of
experts). Every model is an artifact keyed by what made it, so asking twice returns the same model and
trains nothing again; strategies that use the same ingredient share it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import ml_collections

from jaxcollab import lora as lora_lib
from jaxcollab import merging, moe
from jaxcollab.experiments.runner import DataSpec, ModelHandle, Runner


@dataclasses.dataclass(frozen=True)
class OLoraPenalty:
    """o-LoRA's loss terms for a LoRA training: λ·orthogonality to the earlier adapters' A, λ2·L2 on the new.

    `previous` are the LoRA models of the earlier rounds (their adapters give the A bank). In `frozen` mode
    (original O-LoRA) the start is the base and the earlier adapters stay applied as frozen overlays; in
    `merged` mode (the paper) the start already has them merged.
    """

    lam: float
    lambda2: float = 0.0
    mode: str = "merged"  # merged | frozen
    previous: tuple[ModelHandle, ...] = ()


class Lab:
    """The base, trainings and combinations of models, for strategies; see the module docstring."""

    def __init__(self, runner: Runner):
        self._runner = runner

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The experiment's config (read it; changing it changes nothing already built)."""
        return self._runner.config

    @property
    def num_rounds(self) -> int:
        return self._runner.num_rounds

    def base(self) -> ModelHandle:
        """The model every strategy starts from (pretrained, or pre-trained here on the old domain)."""
        return self._runner.base()

    # ------------------------------------------------------------------------------------------- data
    def task(self, j: int) -> DataSpec:
        """Round j's dataset."""
        return DataSpec.task(j)

    def joint(self, j: int) -> DataSpec:
        """The union of the datasets of rounds 1..j (each repeated config.joint.duplication times)."""
        return DataSpec.joint(j, self.config.joint.duplication, self.config.seed)

    def replay(self, j: int) -> DataSpec:
        """Round j's dataset plus config.replay.w_hist of each earlier round's, shuffled together."""
        return DataSpec.replay(j, self.config.replay.w_hist, self.config.seed)

    # --------------------------------------------------------------------------------------- training
    def train(self, start: ModelHandle, data: DataSpec, method: str, *, label: str = "",
              olora: OLoraPenalty | None = None) -> ModelHandle:
        """`start` trained on `data` with `method`: fft, lora (an adapter, folded into the weights) or router
        (a mixture's routers only). `label` names the artifact; the same label, start, data and settings
        give the same model."""
        spec = None
        if olora is not None:
            if method != "lora":
                raise ValueError(f"an o-LoRA penalty needs method='lora', not {method!r}")
            spec = {"lambda": olora.lam, "lambda2": olora.lambda2, "mode": olora.mode,
                    "previous": list(olora.previous)}
        return self._runner.fine_tune(start, data, method, olora=spec, label=label)

    # ---------------------------------------------------------------------------------- combinations
    def average(self, models: Sequence[ModelHandle], label: str) -> ModelHandle:
        """The uniform mean of the models' parameters."""
        runner = self._runner
        return runner.derived(label, {"average": [m.key for m in models]}, runner.model_cfg,
                              lambda: merging.merge("average", None, [runner.params(m) for m in models]))

    def merge_lora(self, method: str, models: Sequence[ModelHandle], label: str) -> ModelHandle:
        """The LoRA models' adapters merged factor by factor (PEFT's add_weighted_adapter: ties, dare_ties,
        ...; density and seed from config.merge), folded into the base."""
        runner = self._runner
        density, seed = self.config.merge.density, self.config.merge.seed
        if any(m.adapter_dir is None for m in models):
            raise ValueError(f"{label}: merge_lora needs LoRA models (trained with method='lora')")

        def build() -> dict:
            adapters = [runner.adapter(m.adapter_dir) for m in models]
            merged = merging.merge_adapters(method, adapters, density=density, seed=seed)
            return lora_lib.fold(runner.params(runner.base()), merged)

        recipe = {"method": method, "adapters": [m.key for m in models], "density": density, "seed": seed}
        return runner.derived(label, recipe, runner.model_cfg, build)

    def mix(self, experts: Sequence[ModelHandle], router: str, label: str) -> ModelHandle:
        """A Mixtral from the base (attention, norms, embeddings) with each model's MLP as an expert:
        router `gateless` (uniform average of all experts) or `noisy` (top-k of config.moe, random router)."""
        runner, cfg = self._runner, self.config
        n = len(experts)
        top_k = min(cfg.moe.top_k, n)
        recipe = {"router": router, "experts": [m.key for m in experts], "top_k": top_k, "seed": cfg.seed,
                  "noise_std": cfg.moe.noise_std}
        moe_cfg = runner.model_cfg.replace(num_experts=n, num_experts_per_tok=n if router == "gateless" else top_k)

        def build() -> dict:
            _, params = moe.mix(runner.model_cfg, runner.params(runner.base()), [runner.params(m) for m in experts],
                                router=router, top_k=top_k, key=jax.random.key(cfg.seed),
                                noise_std=cfg.moe.noise_std)
            return params

        return runner.derived(label, recipe, moe_cfg, build)

"""Semi-collaborative strategies: a round's dataset is gone after its round.

Each strategy maps a round j (1-based) to the model it has after that round:

- `seq_fft`: full fine-tuning of the previous round's model on task j.
- `seq_lora`: a new LoRA adapter on the previous round's model, merged into the weights after the round.
- `olora` (`olora_<λ>` for several λ): sequential LoRA with the orthogonality penalty against the A
  matrices of all earlier rounds (λ = 0 in round 1); `merged` mode (the paper) merges each adapter,
  `frozen` mode (original O-LoRA) keeps earlier adapters as frozen overlays on the base.
- `avg_fft`, `avg_lora`: the uniform mean of all parameters of the models fine-tuned independently from
  the base on tasks 1..j (the "ingredients", FFT or LoRA merged).
- `ties_lora`, `dare_ties_lora`: the LoRA ingredients' factors merged as PEFT's `add_weighted_adapter`
  (density from config, weights 1), then merged into the base.
- `moe_gateless`, `moe_noisy`: the FFT ingredients of tasks 1..j mixed into a Mixtral (base attention,
  each ingredient's MLP an expert): a uniform average of all experts, or a noisy top-k router.
- `moe_router`: `moe_noisy`'s mixture with its routers trained on round j's data only.

Ingredients are trained once and shared by every strategy that uses them. Round 1 of every strategy is the
ingredient of task 1: the sequential ones start from it, and the combining ones (averaging, TIES, DARE,
mixtures) have nothing to combine yet (a top-k mixture cannot be built from one model).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from jaxcollab import lora as lora_lib
from jaxcollab import merging, moe
from jaxcollab.protocols.config import olora_lambdas
from jaxcollab.protocols.runner import DataSpec, ModelHandle, Runner

Strategy = Callable[[int], ModelHandle]


def strategies(runner: Runner, names: list[str]) -> dict[str, Strategy]:
    """The named semi-collaborative strategies, built on `runner`."""
    cfg = runner.config
    base = runner.base

    @functools.cache
    def ingredient(method: str, i: int) -> ModelHandle:
        return runner.fine_tune(base(), DataSpec.task(i), method, label=f"{method}-task{i}")

    @functools.cache
    def sequential(method: str, j: int) -> ModelHandle:
        if j == 1:
            return ingredient(method, 1)
        return runner.fine_tune(sequential(method, j - 1), DataSpec.task(j), method, label=f"seq_{method}-r{j}")

    @functools.cache
    def olora(lam: float, j: int) -> ModelHandle:
        if j == 1:
            return ingredient("lora", 1)
        previous = [olora(lam, i) for i in range(1, j)]
        mode = cfg.olora.mode
        start = base() if mode == "frozen" else previous[-1]
        spec = {"lambda": lam, "lambda2": cfg.olora.lambda2, "mode": mode, "previous": previous}
        return runner.fine_tune(start, DataSpec.task(j), "lora", olora=spec, label=f"olora{lam:g}-r{j}")

    def average(method: str, j: int) -> ModelHandle:
        if j == 1:
            return ingredient(method, 1)
        parts = [ingredient(method, i) for i in range(1, j + 1)]
        return runner.derived(f"avg_{method}-r{j}", {"average": [p.key for p in parts]}, runner.model_cfg,
                              lambda: merging.merge("average", None, [runner.params(p) for p in parts]))

    def lora_merge(method: str, j: int) -> ModelHandle:
        if j == 1:
            return ingredient("lora", 1)
        parts = [ingredient("lora", i) for i in range(1, j + 1)]
        density, seed = cfg.merge.density, cfg.merge.seed

        def build() -> dict:
            adapters = [runner.adapter(p.adapter_dir) for p in parts]
            merged = merging.merge_adapters(method, adapters, density=density, seed=seed)
            return lora_lib.merge(runner.params(base()), merged)

        recipe = {"method": method, "adapters": [p.key for p in parts], "density": density, "seed": seed}
        return runner.derived(f"{method}_lora-r{j}", recipe, runner.model_cfg, build)

    def mixture(router: str, j: int) -> ModelHandle:
        if j == 1:
            return ingredient("fft", 1)
        parts = [ingredient("fft", i) for i in range(1, j + 1)]
        top_k = min(cfg.moe.top_k, j)
        recipe = {"router": router, "experts": [p.key for p in parts], "top_k": top_k, "seed": cfg.seed,
                  "noise_std": cfg.moe.noise_std}
        moe_cfg = runner.model_cfg.replace(num_experts=j, num_experts_per_tok=j if router == "gateless" else top_k)

        def build() -> dict:
            _, params = moe.mix(runner.model_cfg, runner.params(base()), [runner.params(p) for p in parts],
                                router=router, top_k=top_k, key=jax.random.key(cfg.seed),
                                noise_std=cfg.moe.noise_std)
            return params

        return runner.derived(f"moe_{router}-r{j}", recipe, moe_cfg, build)

    def routed(j: int) -> ModelHandle:
        if j == 1:
            return ingredient("fft", 1)
        return runner.fine_tune(mixture("noisy", j), DataSpec.task(j), "router", label=f"moe_router-r{j}")

    table: dict[str, Strategy] = {
        "seq_fft": lambda j: sequential("fft", j),
        "seq_lora": lambda j: sequential("lora", j),
        "avg_fft": lambda j: average("fft", j),
        "avg_lora": lambda j: average("lora", j),
        "ties_lora": lambda j: lora_merge("ties", j),
        "dare_ties_lora": lambda j: lora_merge("dare_ties", j),
        "moe_gateless": lambda j: mixture("gateless", j),
        "moe_noisy": lambda j: mixture("noisy", j),
        "moe_router": routed,
    }
    lambdas = olora_lambdas(cfg)
    table["olora"] = lambda j: olora(lambdas[0], j)
    for lam in lambdas:
        table[f"olora_{lam:g}"] = functools.partial(olora, lam)
    return {name: table[name] for name in names}

"""Semi-collaborative strategies: a round's dataset is gone after its round.

Each strategy maps a round j (1-based) to the model it has after that round:

- `seq_fft`: full fine-tuning of the previous round's model on task j.
- `seq_lora`: a new LoRA adapter on the previous round's model, folded into the weights after the round.
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

Each strategy is a function `(lab, j) -> ModelHandle` registered by name (`experiments.registry`); a user's
module adds more the same way. Ingredients are trained once and shared by every strategy that uses them.
Round 1 of every strategy is the ingredient of task 1: the sequential ones start from it, and the combining
ones (averaging, TIES, DARE, mixtures) have nothing to combine yet (a top-k mixture cannot be built from
one model).
"""

from __future__ import annotations

from jaxcollab.experiments.config import olora_lambdas
from jaxcollab.experiments.lab import Lab, OLoraPenalty
from jaxcollab.experiments.registry import strategy, strategy_family
from jaxcollab.experiments.runner import ModelHandle


def ingredient(lab: Lab, method: str, i: int) -> ModelHandle:
    """The base fine-tuned on task i alone (fft or lora): shared by every strategy that uses it."""
    return lab.train(lab.base(), lab.task(i), method, label=f"{method}-task{i}")


def sequential(lab: Lab, method: str, j: int) -> ModelHandle:
    model = ingredient(lab, method, 1)
    for i in range(2, j + 1):
        model = lab.train(model, lab.task(i), method, label=f"seq_{method}-r{i}")
    return model


@strategy("seq_fft", setting="semi")
def seq_fft(lab: Lab, j: int) -> ModelHandle:
    return sequential(lab, "fft", j)


@strategy("seq_lora", setting="semi")
def seq_lora(lab: Lab, j: int) -> ModelHandle:
    return sequential(lab, "lora", j)


def olora(lab: Lab, lam: float, j: int) -> ModelHandle:
    """Round j of sequential LoRA with o-LoRA's penalty at λ = `lam` against every earlier round."""
    mode, lambda2 = lab.config.olora.mode, lab.config.olora.lambda2
    models = [ingredient(lab, "lora", 1)]
    for i in range(2, j + 1):
        start = lab.base() if mode == "frozen" else models[-1]
        penalty = OLoraPenalty(lam, lambda2, mode, tuple(models))
        models.append(lab.train(start, lab.task(i), "lora", olora=penalty, label=f"olora{lam:g}-r{i}"))
    return models[-1]


@strategy("olora", setting="semi")
def olora_first_lambda(lab: Lab, j: int) -> ModelHandle:
    return olora(lab, olora_lambdas(lab.config)[0], j)


@strategy_family("olora_", setting="semi")
def olora_at(suffix: str):
    """`olora_<λ>`: o-LoRA at that λ (config.olora.lambdas with several values names one strategy per λ)."""
    try:
        lam = float(suffix)
    except ValueError:
        raise ValueError(f"olora_{suffix}: the suffix must be a number (λ), e.g. olora_0.1") from None
    return lambda lab, j: olora(lab, lam, j)


def _combined(lab: Lab, method: str, j: int, label: str, combine) -> ModelHandle:
    if j == 1:  # nothing to combine yet: round 1 is the first ingredient
        return ingredient(lab, method, 1)
    return combine([ingredient(lab, method, i) for i in range(1, j + 1)], f"{label}-r{j}")


@strategy("avg_fft", setting="semi")
def avg_fft(lab: Lab, j: int) -> ModelHandle:
    return _combined(lab, "fft", j, "avg_fft", lab.average)


@strategy("avg_lora", setting="semi")
def avg_lora(lab: Lab, j: int) -> ModelHandle:
    return _combined(lab, "lora", j, "avg_lora", lab.average)


@strategy("ties_lora", setting="semi")
def ties_lora(lab: Lab, j: int) -> ModelHandle:
    return _combined(lab, "lora", j, "ties_lora", lambda parts, label: lab.merge_lora("ties", parts, label))


@strategy("dare_ties_lora", setting="semi")
def dare_ties_lora(lab: Lab, j: int) -> ModelHandle:
    return _combined(lab, "lora", j, "dare_ties_lora",
                     lambda parts, label: lab.merge_lora("dare_ties", parts, label))


@strategy("moe_gateless", setting="semi")
def moe_gateless(lab: Lab, j: int) -> ModelHandle:
    return _combined(lab, "fft", j, "moe_gateless", lambda parts, label: lab.mix(parts, "gateless", label))


@strategy("moe_noisy", setting="semi")
def moe_noisy(lab: Lab, j: int) -> ModelHandle:
    return _combined(lab, "fft", j, "moe_noisy", lambda parts, label: lab.mix(parts, "noisy", label))


@strategy("moe_router", setting="semi")
def moe_router(lab: Lab, j: int) -> ModelHandle:
    if j == 1:
        return ingredient(lab, "fft", 1)
    return lab.train(moe_noisy(lab, j), lab.task(j), "router", label=f"moe_router-r{j}")

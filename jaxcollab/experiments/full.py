"""Fully-collaborative strategies: every dataset stays available.

- `joint_fft`, `joint_lora`: round j trains the base on the union of tasks 1..j (each dataset repeated
  `joint.duplication` times), with full fine-tuning or one LoRA adapter merged at the end.
- `replay_fft`, `replay_lora`: sequential training where round j sees task j in full plus
  `round(w_hist · |task j|)` examples of each earlier task (seeded, with wrap-around), shuffled together.
"""

from __future__ import annotations

from jaxcollab.experiments.lab import Lab
from jaxcollab.experiments.registry import strategy
from jaxcollab.experiments.runner import ModelHandle


def joint(lab: Lab, method: str, j: int) -> ModelHandle:
    data = lab.joint(j)
    label = f"{method}-task1" if data.kind == "task" else f"joint_{method}-r{j}"
    return lab.train(lab.base(), data, method, label=label)


def replay(lab: Lab, method: str, j: int) -> ModelHandle:
    model = lab.train(lab.base(), lab.replay(1), method, label=f"{method}-task1")
    for i in range(2, j + 1):
        model = lab.train(model, lab.replay(i), method, label=f"replay_{method}-r{i}")
    return model


@strategy("joint_fft", setting="full")
def joint_fft(lab: Lab, j: int) -> ModelHandle:
    return joint(lab, "fft", j)


@strategy("joint_lora", setting="full")
def joint_lora(lab: Lab, j: int) -> ModelHandle:
    return joint(lab, "lora", j)


@strategy("replay_fft", setting="full")
def replay_fft(lab: Lab, j: int) -> ModelHandle:
    return replay(lab, "fft", j)


@strategy("replay_lora", setting="full")
def replay_lora(lab: Lab, j: int) -> ModelHandle:
    return replay(lab, "lora", j)

"""Fully-collaborative strategies: every dataset stays available.

- `joint_fft`, `joint_lora`: round j trains the base on the union of tasks 1..j (each dataset repeated
  `joint.duplication` times), with full fine-tuning or one LoRA adapter merged at the end.
- `replay_fft`, `replay_lora`: sequential training where round j sees task j in full plus
  `round(w_hist · |task j|)` examples of each earlier task (seeded, with wrap-around), shuffled together.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from jaxcollab.protocols.runner import DataSpec, ModelHandle, Runner

Strategy = Callable[[int], ModelHandle]


def strategies(runner: Runner, names: list[str]) -> dict[str, Strategy]:
    """The named fully-collaborative strategies, built on `runner`."""
    cfg = runner.config

    def joint(method: str, j: int) -> ModelHandle:
        data = DataSpec.joint(j, cfg.joint.duplication, cfg.seed)
        label = f"{method}-task1" if data.kind == "task" else f"joint_{method}-r{j}"
        return runner.fine_tune(runner.base(), data, method, label=label)

    @functools.cache
    def replay(method: str, j: int) -> ModelHandle:
        data = DataSpec.replay(j, cfg.replay.w_hist, cfg.seed)
        if j == 1:
            return runner.fine_tune(runner.base(), data, method, label=f"{method}-task1")
        return runner.fine_tune(replay(method, j - 1), data, method, label=f"replay_{method}-r{j}")

    table: dict[str, Strategy] = {
        "joint_fft": lambda j: joint("fft", j),
        "joint_lora": lambda j: joint("lora", j),
        "replay_fft": lambda j: replay("fft", j),
        "replay_lora": lambda j: replay("lora", j),
    }
    return {name: table[name] for name in names}

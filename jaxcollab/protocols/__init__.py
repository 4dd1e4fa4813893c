"""The paper's experiments: strategies of the semi- and fully-collaborative settings, run round by round.

    runner = Runner(config, workdir)
    results = run_experiment(runner)   # the results.json contents
"""

from __future__ import annotations

import json
from collections.abc import Callable

from jaxcollab.protocols import full, semi
from jaxcollab.protocols.config import (
    ExperimentConfigError,
    experiment_config,
    old_measures,
    strategy_names,
    validate,
)
from jaxcollab.protocols.runner import DataSpec, ModelHandle, Runner


def run_experiment(runner: Runner, on_strategy: Callable[[str, dict], None] | None = None,
                   on_round: Callable[[str, int], None] | None = None) -> dict:
    """Run every configured strategy and return the results (the contract's results.json)."""
    config = runner.config
    names = strategy_names(config)
    build = semi.strategies if config.setting == "semi" else full.strategies
    table = build(runner, names)
    results: dict = {
        "setting": config.setting,
        "tasks": [t.name for t in runner.tasks],
        "old_knowledge": old_measures(config),
        "constant_answer": [runner.constant_answer(j) for j in range(1, runner.num_rounds + 1)],
        "strategies": {},
        "config": json.loads(config.to_json()),
    }
    if not results["old_knowledge"]:  # the legacy suite: a generation task and multiple-choice files, averaged
        results["old_knowledge"] = [runner.old_task.name] if runner.old_task is not None else []
        results["old_knowledge"] += [f"mc:{p}" for p, _ in runner.old_mc]
    for name in names:
        results["strategies"][name] = runner.run_strategy(
            name, table[name], on_round=(lambda j, name=name: on_round(name, j)) if on_round else None)
        if on_strategy is not None:
            on_strategy(name, results["strategies"][name])
    return results


__all__ = [
    "DataSpec",
    "ExperimentConfigError",
    "ModelHandle",
    "Runner",
    "experiment_config",
    "run_experiment",
    "strategy_names",
    "validate",
]

"""The paper's experiments: strategies of the semi- and fully-collaborative settings, run round by round.

    runner = Runner(config, workdir)
    results = run_experiment(runner)   # the results.json contents

A strategy is a function `(lab, j) -> ModelHandle` registered with `@strategy(name, setting=...)`
(registry.py); `Lab` (lab.py) is all it sees. The built-in ones are in semi.py and full.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from jaxcollab.experiments import full, registry, semi  # noqa: F401  (semi, full register the built-ins)
from jaxcollab.experiments.config import (
    ExperimentConfigError,
    experiment_config,
    old_measures,
    strategy_names,
    validate,
)
from jaxcollab.experiments.lab import Lab, OLoraPenalty
from jaxcollab.experiments.registry import StrategyError, strategy, strategy_family
from jaxcollab.experiments.runner import DataSpec, ModelHandle, Runner


def run_experiment(runner: Runner, on_strategy: Callable[[str, dict], None] | None = None,
                   on_round: Callable[[str, int], None] | None = None) -> dict:
    """Run every configured strategy and return the results (the contract's results.json)."""
    config = runner.config
    names = strategy_names(config)
    lab = Lab(runner)
    table = {name: registry.get(config.setting, name) for name in names}
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
        report_round = (lambda j, name=name: on_round(name, j)) if on_round else None
        results["strategies"][name] = runner.run_strategy(name, lambda j, fn=table[name]: fn(lab, j),
                                                          on_round=report_round)
        if on_strategy is not None:
            on_strategy(name, results["strategies"][name])
    return results


def plan_experiment(runner: Runner) -> list[str]:
    """What `run_experiment` would do, as lines of text: each strategy's model per round, then every
    training (to run, to resume from its checkpoint, or reused from an earlier run, with steps and tokens)
    and every model computed from others. `runner` must be a dry-run runner: nothing is trained or scored."""
    if not runner.dry_run:
        raise ValueError("plan_experiment needs Runner(..., dry_run=True)")
    config = runner.config
    names = strategy_names(config)
    lab = Lab(runner)
    lines = [f"plan: {config.setting} setting, variant {config.variant}, {runner.num_rounds} rounds"
             f" ({', '.join(t.name for t in runner.tasks)}); workdir {runner.workdir}", "strategies (model per round):"]
    for name in names:
        fn = registry.get(config.setting, name)
        models = [fn(lab, j).key for j in range(1, runner.num_rounds + 1)]
        lines.append(f"  {name}: " + ", ".join(f"r{j} {key}" for j, key in enumerate(models, 1)))
    entries = list(runner.plan.items())
    count = {a: sum(e["action"] == a for _, e in entries) for a in ("train", "resume", "reuse", "compute")}
    lines.append(f"trainings: {count['train']} to run, {count['resume']} to resume, {count['reuse']} reused;"
                 f" {count['compute']} models computed from others (merges, mixtures)")
    for key, e in entries:
        if e["action"] in ("train", "resume"):
            lines.append(f"  {e['action']:<6} {key}: {e['method']}, {e['steps']} steps ({e['epochs']:g} epochs of"
                         f" {e['examples']} examples, {e['tokens_per_epoch']:,} tokens per epoch)")
        elif e["action"] == "reuse":
            lines.append(f"  reuse  {key}")
    return lines


__all__ = [
    "DataSpec",
    "ExperimentConfigError",
    "Lab",
    "ModelHandle",
    "OLoraPenalty",
    "Runner",
    "StrategyError",
    "experiment_config",
    "plan_experiment",
    "run_experiment",
    "strategy",
    "strategy_family",
    "strategy_names",
    "validate",
]

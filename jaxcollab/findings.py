"""The paper's findings, checked on a run: paired differences between strategies with 95% intervals.

The study's abstract makes four claims (arXiv 2410.14753). Each becomes comparisons between two strategies
of a run at its final round, on items that both models were asked (the same questions, the same MMLU
rows), so each comparison is a paired difference with a t interval (`evaluation.stats`):

1. LoRA keeps old knowledge better than full fine-tuning: `X_lora - X_fft` on every old-knowledge measure.
2. In the semi setting, MoE mixing and model merging do well: each combining strategy against sequential
   fine-tuning of the same family on OP (every task so far) and on the old-knowledge measures.
3. o-LoRA with a small lambda helps: `olora - seq_lora` on OP and on recent (the earlier tasks).
4. With all data, joint training and replay both work (LoRA preferred): `joint_X` and `replay_X` of the
   full run against `seq_X` of the semi run on recent and OP (the runs must share tasks and data seed),
   and `X_lora - X_fft` on OP.

A comparison "holds" when its interval lies above zero, is "contradicted" when it lies below, and is
"not resolved" otherwise: too few items to tell. Comparisons whose strategies a run lacks are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxcollab.evaluation.stats import paired_difference_ci

__all__ = ["Comparison", "check_findings", "final_items", "paired_difference", "verdict"]

COMBINERS = {"avg_lora": "seq_lora", "ties_lora": "seq_lora", "dare_ties_lora": "seq_lora",
             "avg_fft": "seq_fft", "moe_gateless": "seq_fft", "moe_noisy": "seq_fft", "moe_router": "seq_fft"}
LORA_FFT_PAIRS = (("seq_lora", "seq_fft"), ("avg_lora", "avg_fft"), ("joint_lora", "joint_fft"),
                  ("replay_lora", "replay_fft"))


@dataclass(frozen=True)
class Comparison:
    """`better - worse` on `measure` at the final round: the mean paired difference and its 95% interval."""

    finding: int
    claim: str
    better: str
    worse: str
    measure: str
    difference: float
    ci95: tuple[float, float]
    n: int

    @property
    def verdict(self) -> str:
        return verdict(self.ci95)


def verdict(ci95: Sequence[float]) -> str:
    low, high = ci95
    if math.isnan(low) or math.isnan(high):
        return "not resolved"
    if low > 0:
        return "holds"
    if high < 0:
        return "contradicted"
    return "not resolved"


def final_items(strategy: dict, measure: str) -> list[float] | None:
    """The per-item values behind `measure` of a strategy's final round: `op` (items of every task so far),
    `recent` (the earlier tasks), `new` (the last task), or an old-knowledge measure's name."""
    if measure in ("op", "recent", "new"):
        rows = strategy.get("R_items")
        if not rows:
            return None
        last = rows[-1]
        rounds = len(rows) - 1
        columns = {"op": range(rounds), "recent": range(rounds - 1), "new": range(rounds - 1, rounds)}[measure]
        values: list[float] = []
        for column in columns:
            if last[column] is None:
                return None
            values.extend(last[column])
        return values or None
    old = strategy.get("old_measures", {}).get(measure)
    return list(old["per_item"][-1]) if old else None


def paired_difference(items_a: Sequence[float] | None,
                      items_b: Sequence[float] | None) -> tuple[float, tuple[float, float]] | None:
    """mean(a - b) over items scored twice, and its paired 95% interval; None without two matching items."""
    if items_a is None or items_b is None or len(items_a) != len(items_b) or len(items_a) < 2:
        return None
    difference = float(np.mean(np.asarray(items_a) - np.asarray(items_b)))
    return difference, paired_difference_ci(items_a, items_b)


def _compare(finding: int, claim: str, a: tuple[str, dict], b: tuple[str, dict], measure: str) -> Comparison | None:
    items_a = final_items(a[1], measure)
    paired = paired_difference(items_a, final_items(b[1], measure))
    if paired is None:
        return None
    return Comparison(finding, claim, a[0], b[0], measure, paired[0], paired[1], len(items_a))


def _old_names(results: Sequence[dict]) -> list[str]:
    names: list[str] = []
    for run in results:
        for strategy in run["strategies"].values():
            names.extend(n for n in strategy.get("old_measures", {}) if n not in names)
    return names


def _same_data(results: Sequence[dict]) -> bool:
    """Whether runs asked the same questions: the same tasks, seed and data settings."""
    keys = {(tuple(run["tasks"]), run["config"].get("seed"), repr(sorted(run["config"].get("data", {}).items())))
            for run in results}
    return len(keys) == 1


def check_findings(results: Sequence[dict]) -> list[Comparison]:
    """Every comparison of the four findings that the given runs (results.json contents) allow."""
    by_setting: dict[str, dict[str, dict]] = {}
    for run in results:
        by_setting.setdefault(run["setting"], {}).update(run["strategies"])
    semi, full = by_setting.get("semi", {}), by_setting.get("full", {})
    every = {**semi, **full}
    old = _old_names(results)
    out: list[Comparison | None] = []
    claim1 = "LoRA keeps old knowledge better than full fine-tuning"
    for lora, fft in LORA_FFT_PAIRS:
        if lora in every and fft in every:
            out += [_compare(1, claim1, (lora, every[lora]), (fft, every[fft]), m) for m in old]
    claim2 = "MoE mixing and model merging do well in the semi-collaborative setting"
    for combiner, sequential in COMBINERS.items():
        if combiner in semi and sequential in semi:
            for measure in ("op", *old):
                out.append(_compare(2, claim2, (combiner, semi[combiner]), (sequential, semi[sequential]), measure))
    claim3 = "o-LoRA with a small lambda helps"
    for name in semi:
        if (name == "olora" or name.startswith("olora_")) and "seq_lora" in semi:
            for measure in ("op", "recent"):
                out.append(_compare(3, claim3, (name, semi[name]), ("seq_lora", semi["seq_lora"]), measure))
    claim4 = "with all data, joint training and replay both work, LoRA preferred"
    same_tasks = _same_data(results)
    for method in ("lora", "fft"):
        for strategy in (f"joint_{method}", f"replay_{method}"):
            if strategy in full and f"seq_{method}" in semi and same_tasks:
                for measure in ("recent", "op"):
                    out.append(_compare(4, claim4, (strategy, full[strategy]), (f"seq_{method}", semi[f"seq_{method}"]),
                                        measure))
    for kind in ("joint", "replay"):
        if f"{kind}_lora" in full and f"{kind}_fft" in full:
            out.append(_compare(4, claim4, (f"{kind}_lora", full[f"{kind}_lora"]), (f"{kind}_fft", full[f"{kind}_fft"]),
                                "op"))
    return [c for c in out if c is not None]

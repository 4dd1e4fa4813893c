"""Weight drift and the paper's findings checked on hand-made results: intervals, verdicts, the report."""

import copy
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcollab import report
from jaxcollab.evaluation.drift import relative_change
from jaxcollab.findings import check_findings, final_items, verdict


def test_relative_change_is_the_global_frobenius_ratio():
    reference = {"a": jnp.asarray([[3.0, 0.0], [0.0, 0.0]]), "b": {"c": jnp.asarray([4.0])}}
    moved = {"a": jnp.asarray([[3.0, 1.0], [0.0, 0.0]]), "b": {"c": jnp.asarray([6.0])}}
    # ||(0, 1, 0, 0, 2)|| / ||(3, 0, 0, 0, 4)|| = sqrt(5) / 5
    assert relative_change(moved, reference) == pytest.approx(math.sqrt(5) / 5, rel=1e-6)
    assert relative_change(reference, reference) == 0.0
    bf16 = {"a": reference["a"].astype(jnp.bfloat16), "b": {"c": reference["b"]["c"].astype(jnp.bfloat16)}}
    assert relative_change(bf16, reference) == 0.0
    with pytest.raises(ValueError, match="structure"):
        relative_change({"a": reference["a"]}, reference)
    with pytest.raises(ValueError, match="shapes differ"):
        relative_change({"a": jnp.zeros((2, 3)), "b": {"c": jnp.zeros(1)}}, reference)


def strategy(old_items, last_row_items):
    """A strategy record with two rounds: per-item old scores (base, r1, r2) and the final row's task items."""
    values = [float(np.mean(v)) for v in old_items]
    recent, new = (float(np.mean(items)) for items in last_row_items)
    return {
        "R": [[0.0, 0.0], [1.0, None], [recent, new]],
        "R_items": [[[0.0] * 4, [0.0] * 4], [[1.0] * 4, None], last_row_items],
        "old": values, "new": [1.0, new], "recent": [None, recent], "op": [1.0, (recent + new) / 2],
        "bwt": [None, recent - 1.0],
        "old_measures": {"mmlu_cloze": {"value": values, "ci95": [[v - 0.1, v + 0.1] for v in values],
                                        "n": len(old_items[0]),
                                        "chance": 0.25, "change": [0.0, 0.0, 0.0], "change_ci95": [None, None, None],
                                        "forgetting": [False, False, False], "per_item": old_items}},
        "seconds": 1.0,
    }


def test_findings_pair_items_and_call_a_verdict_only_outside_zero():
    base = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    kept = strategy([base, base, base], [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    lost = strategy([base, base, [0.0] * 8], [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    close = strategy([base, base, base], [[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    run = {"setting": "semi", "tasks": ["t1", "t2"], "config": {"seed": 0, "data": {}},
           "strategies": {"seq_lora": kept, "seq_fft": lost, "avg_lora": lost, "ties_lora": close}}
    comparisons = {(c.finding, c.better, c.worse, c.measure): c for c in check_findings([run])}
    lora_vs_fft = comparisons[(1, "seq_lora", "seq_fft", "mmlu_cloze")]
    # per item: base (= seq_lora's final) minus zeros; mean 0.75 with a t interval above zero
    assert lora_vs_fft.difference == pytest.approx(0.75) and lora_vs_fft.n == 8
    assert lora_vs_fft.ci95[0] > 0 and lora_vs_fft.verdict == "holds"
    merge_vs_seq = comparisons[(2, "avg_lora", "seq_lora", "op")]
    # per item: four -1 and four 0; mean -0.5, t interval [-0.947, -0.053] (t_{0.975, 7} = 2.365)
    assert merge_vs_seq.difference == pytest.approx(-0.5) and merge_vs_seq.verdict == "contradicted"
    assert merge_vs_seq.ci95 == pytest.approx((-0.5 - 2.3646 * 0.5345 / 8**0.5, -0.5 + 2.3646 * 0.5345 / 8**0.5),
                                              abs=1e-3)
    one_item = comparisons[(2, "ties_lora", "seq_lora", "op")]  # a single item differs: too few to tell
    assert one_item.difference == pytest.approx(-0.125) and one_item.verdict == "not resolved"
    assert final_items(kept, "op") == [1.0] * 8 and final_items(lost, "recent") == [0.0] * 4
    assert final_items(kept, "new") == [1.0] * 4
    assert verdict((-0.2, -0.1)) == "contradicted" and verdict((math.nan, math.nan)) == "not resolved"
    # the full setting's replay needs the semi run of the same data to compare with
    full = {"setting": "full", "tasks": ["t1", "t2"], "config": {"seed": 0, "data": {}},
            "strategies": {"replay_lora": kept}}
    assert any(c.better == "replay_lora" and c.worse == "seq_lora" for c in check_findings([run, full]))
    other_seed = {**full, "config": {"seed": 1, "data": {}}}
    assert not any(c.better == "replay_lora" for c in check_findings([run, other_seed]))


def test_report_shows_intervals_old_measures_and_findings():
    base = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    kept = strategy([base, base, base], [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    kept["weight_change"] = {"from_base": [0.001, 0.002], "update": [0.001, 0.001]}
    run = {"setting": "semi", "tasks": ["t1", "t2"], "config": {"seed": 0, "data": {}}, "old_knowledge": ["mmlu_cloze"],
           "strategies": {"seq_lora": kept, "seq_fft": strategy([base, base, [0.0] * 8], [[0.0] * 4, [1.0] * 4])}}
    text = report.markdown(run)
    # new = 4/4 correct: Wilson interval [0.510, 1.000]; ‖ΔW‖/‖W‖ as a percentage
    assert "| seq_lora | 1.000 [0.510, 1.000] |" in text and "| 0.20% |" in text
    assert "### mmlu_cloze" in text and "8 items per model; chance 0.250." in text
    assert "does not score above chance" not in text  # the base's 0.75 [0.65, 0.85] is above 0.25
    at_chance = copy.deepcopy(run)
    for s in at_chance["strategies"].values():
        s["old_measures"]["mmlu_cloze"]["ci95"][0] = [0.2, 0.4]
    assert "**The base does not score above chance beyond its interval**" in report.markdown(at_chance)
    assert "| 1. LoRA keeps old knowledge better than full fine-tuning | seq_lora − seq_fft | mmlu_cloze |" in text

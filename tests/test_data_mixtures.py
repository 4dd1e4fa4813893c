"""Mixtures: replay sizes follow round(w_hist * |current|) with wrap-around sampling; joint duplication."""

from collections import Counter

import numpy as np
import pytest
from trace_root import TRACE_ROOT

from jaxcollab.data import get_task, joint_mixture, replay_indices, replay_mixture, replay_size

needs_trace = pytest.mark.skipif(not TRACE_ROOT.is_dir(), reason=f"TRACE data not found at {TRACE_ROOT}")


def _rows(tag: str, n: int) -> list[dict[str, str]]:
    return [{"prompt": f"{tag}-{i}", "answer": tag} for i in range(n)]


def test_replay_size_formula():
    assert replay_size(500) == 50
    assert replay_size(5000, 0.1) == 500
    assert replay_size(35, 0.1) == 4  # 3.5 -> 4
    assert replay_size(25, 0.1) == 2  # 2.5 -> 2: Python's round, halves to even
    assert replay_size(376, 0.25) == 94
    assert replay_size(10, 0.0) == 0
    with pytest.raises(ValueError, match="w_hist"):
        replay_size(10, -0.1)


def test_replay_mixture_sizes_and_sources():
    current, big, small = _rows("cur", 70), _rows("big", 40), _rows("small", 3)
    mixed = replay_mixture(current, [big, small], w_hist=0.1, seed=0)
    # 70 current + round(7.0) = 7 from each earlier dataset.
    assert len(mixed) == 70 + 7 + 7
    assert Counter(mixed["source"]) == {0: 70, 1: 7, 2: 7}
    assert Counter(mixed["answer"]) == {"cur": 70, "big": 7, "small": 7}
    assert sorted(p for p in mixed["prompt"] if p.startswith("cur-")) == sorted(r["prompt"] for r in current)
    big_picked = [p for p in mixed["prompt"] if p.startswith("big-")]
    assert len(set(big_picked)) == 7  # fewer than 40: no repeats
    # Wrap-around: a 3-row set asked for 7 gives each row 2 or 3 times.
    assert sorted(Counter(p for p in mixed["prompt"] if p.startswith("small-")).values()) == [2, 2, 3]
    assert list(mixed["source"][:70]) != [0] * 70  # shuffled together
    assert mixed.column_names == ["prompt", "answer", "source"]


def test_replay_is_seeded():
    current, earlier = _rows("cur", 50), _rows("old", 100)
    a = replay_mixture(current, [earlier], seed=1)
    assert list(a["prompt"]) == list(replay_mixture(current, [earlier], seed=1)["prompt"])
    assert sorted(replay_mixture(current, [earlier], seed=2)["prompt"]) != sorted(a["prompt"])
    assert len(replay_mixture(current, [], seed=0)) == 50


def test_replay_indices_wrap_around_a_permutation():
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    perm = rng_b.permutation(4)
    idx = replay_indices(4, 10, rng_a)
    assert idx.tolist() == [*perm, *perm, *perm[:2]]


def test_joint_mixture_duplicates_each_dataset():
    a, b = _rows("a", 5), _rows("b", 3)
    union = joint_mixture([a, b])
    assert Counter(union["answer"]) == {"a": 5, "b": 3}
    doubled = joint_mixture([a, b], duplication=2)
    assert Counter(doubled["prompt"]) == Counter({r["prompt"]: 2 for r in a + b})
    per_set = joint_mixture([a, b], duplication=[1, 3], seed=4)
    assert Counter(per_set["source"]) == {0: 5, 1: 9}
    assert list(joint_mixture([a, b], shuffle=False)["prompt"]) == [r["prompt"] for r in a + b]
    with pytest.raises(ValueError, match="duplication has 1 factors for 2 datasets"):
        joint_mixture([a, b], duplication=[2])
    with pytest.raises(ValueError, match="empty dataset"):
        joint_mixture([a, []])


@needs_trace
def test_replay_on_trace_follows_the_formula():
    cstance = get_task("C-STANCE", root=TRACE_ROOT).load("train")
    fomc = get_task("FOMC", root=TRACE_ROOT).load("train")
    meeting = get_task("MeetingBank", root=TRACE_ROOT).load("train")  # 376 rows (substitute)
    mixed = replay_mixture(meeting, [cstance, fomc], w_hist=0.1, seed=0)
    assert len(mixed) == 376 + 2 * 38  # round(37.6) = 38 from each
    assert Counter(mixed["source"]) == {0: 376, 1: 38, 2: 38}

"""Knowledge measures on hand-computed score matrices, and the KnowledgeMatrix helper."""

import json
import math

import numpy as np
import pytest

from jaxcollab.evaluation.knowledge import (
    KnowledgeMatrix,
    backward_transfer,
    new_knowledge,
    old_knowledge,
    overall_performance,
    recent_knowledge,
    summarize,
)

NAN = math.nan

# Three rounds over tasks T1, T2, T3 (columns 0, 1, 2); row 0 is the base model.
R3 = [
    [0.20, 0.10, 0.30],  # base
    [0.80, 0.20, 0.30],  # after round 1 (learned T1)
    [0.60, 0.90, 0.40],  # after round 2 (learned T2)
    [0.50, 0.70, 0.95],  # after round 3 (learned T3)
]
OLD3 = [0.60, 0.58, 0.55, 0.50]

# By hand, rounds j = 1, 2, 3:
#   new    = R[1,T1], R[2,T2], R[3,T3]                     = 0.80, 0.90, 0.95
#   recent = -, R[2,T1], mean(R[3,T1], R[3,T2])            = None, 0.60, (0.50 + 0.70) / 2 = 0.60
#   op     = R[1,T1], mean(0.60, 0.90), mean(0.50, 0.70, 0.95) = 0.80, 0.75, 2.15 / 3
#   bwt    = -, 0.60 - 0.80, ((0.50 - 0.80) + (0.70 - 0.90)) / 2 = None, -0.20, -0.25
#   old    = 0.58, 0.55, 0.50 (old_base 0.60)
EXPECTED3 = {
    "new": [0.80, 0.90, 0.95],
    "recent": [None, 0.60, 0.60],
    "op": [0.80, 0.75, 2.15 / 3],
    "bwt": [None, -0.20, -0.25],
    "old": [0.58, 0.55, 0.50],
}


def _assert_measure(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        if want is None:
            assert got is None
        else:
            assert got == pytest.approx(want, abs=1e-12)


def test_summarize_three_rounds_by_hand():
    summary = summarize(R3, OLD3)
    assert summary["rounds"] == [1, 2, 3]
    for measure, expected in EXPECTED3.items():
        _assert_measure(summary[measure], expected)
    assert summary["old_base"] == 0.60
    assert summary["R"] == R3
    json.dumps(summary, allow_nan=False)  # strict JSON: NaN became None


def test_measure_functions_return_nan_where_undefined():
    assert new_knowledge(R3) == pytest.approx([0.80, 0.90, 0.95])
    assert overall_performance(R3) == pytest.approx([0.80, 0.75, 2.15 / 3])
    recent, bwt = recent_knowledge(R3), backward_transfer(R3)
    assert math.isnan(recent[0]) and math.isnan(bwt[0])
    assert recent[1:] == pytest.approx([0.60, 0.60])
    assert bwt[1:] == pytest.approx([-0.20, -0.25])
    assert old_knowledge(R3, OLD3) == pytest.approx([0.58, 0.55, 0.50])
    assert np.isnan(old_knowledge(R3, None)).all()


def test_scores_on_future_tasks_and_the_base_row_do_not_enter_the_measures():
    changed = np.array(R3)
    changed[0, :] = [0.99, 0.0, NAN]  # base row
    changed[1, 1:] = NAN  # after round 1, on tasks not yet learned
    changed[2, 2] = 0.0
    summary = summarize(changed, OLD3)
    for measure, expected in EXPECTED3.items():
        _assert_measure(summary[measure], expected)


def test_a_missing_entry_makes_only_the_measures_that_need_it_undefined():
    missing = np.array(R3)
    missing[3, 0] = NAN  # T1 not evaluated after round 3
    summary = summarize(missing, None)
    _assert_measure(summary["new"], [0.80, 0.90, 0.95])
    _assert_measure(summary["recent"], [None, 0.60, None])
    _assert_measure(summary["op"], [0.80, 0.75, None])
    _assert_measure(summary["bwt"], [None, -0.20, None])
    assert summary["old"] == [None, None, None] and summary["old_base"] is None


def test_summarize_reads_its_own_json_form_back():
    first = summarize(R3, [None, 0.58, 0.55, 0.50])
    assert first["old_base"] is None
    with_gap = [row[:] for row in first["R"]]
    with_gap[2][0] = None  # T1 not evaluated after round 2
    again = summarize(with_gap, [None, 0.58, 0.55, 0.50])
    _assert_measure(again["recent"], [None, None, 0.60])
    _assert_measure(again["op"], [0.80, None, 2.15 / 3])
    _assert_measure(again["old"], [0.58, 0.55, 0.50])
    assert again["R"] == with_gap


def test_one_round_and_more_tasks_than_rounds():
    # 1 round, 2 task columns: new_1 = 0.7, op_1 = 0.7, recent and bwt undefined.
    summary = summarize([[0.1, 0.2], [0.7, 0.3]], [0.5, 0.4])
    assert summary["new"] == [0.7] and summary["op"] == [0.7]
    assert summary["recent"] == [None] and summary["bwt"] == [None]
    assert summary["old"] == [0.4] and summary["old_base"] == 0.5
    empty = summarize([[0.1, 0.2]])  # base only: no rounds
    assert empty["rounds"] == [] and empty["new"] == [] and empty["bwt"] == []


@pytest.mark.parametrize(
    "R, old, message",
    [
        ([0.1, 0.2], None, r"2-D"),
        (np.zeros((4, 2)), None, r"4 rows .* only 2 task columns"),
        (np.zeros((0, 3)), None, r"at least row 0"),
        (np.full((2, 2), np.inf), None, r"infinite"),
        (R3, [0.6, 0.5, 0.4], r"shape \(4,\) for 3 rounds; got shape \(3,\)"),
    ],
)
def test_bad_shapes_are_clear_errors(R, old, message):
    with pytest.raises(ValueError, match=message):
        summarize(R, old)


def test_knowledge_matrix_filled_by_name_and_index_matches_the_hand_computed_summary():
    km = KnowledgeMatrix(["T1", "T2", "T3"])
    assert km.R.shape == (4, 3) and np.isnan(km.R).all()
    for round_index, row in enumerate(R3):
        for task_index, value in enumerate(row):
            task = f"T{task_index + 1}" if task_index % 2 == 0 else task_index
            km.set_score(round_index, task, value)
        km.set_old(round_index, OLD3[round_index])
    summary = km.summary()
    for measure, expected in EXPECTED3.items():
        _assert_measure(summary[measure], expected)


def test_knowledge_matrix_json_round_trip_keeps_missing_entries():
    km = KnowledgeMatrix(["C-STANCE", "FOMC"])
    km.set_score(0, "FOMC", 0.41)
    km.set_score(1, "C-STANCE", 0.5)
    km.set_old(1, 0.6)
    text = km.to_json()
    assert json.loads(text) == {
        "tasks": ["C-STANCE", "FOMC"],
        "R": [[None, 0.41], [0.5, None], [None, None]],
        "old": [None, 0.6, None],
    }
    back = KnowledgeMatrix.from_json(text)
    assert back.tasks == km.tasks
    np.testing.assert_array_equal(back.R, km.R)  # NaN positions equal too
    np.testing.assert_array_equal(back.old, km.old)


def test_knowledge_matrix_errors():
    km = KnowledgeMatrix(["A", "B"])
    with pytest.raises(KeyError, match="unknown task 'C'"):
        km.set_score(1, "C", 0.5)
    with pytest.raises(IndexError, match=r"round must be in 0\.\.2"):
        km.set_score(3, "A", 0.5)
    with pytest.raises(IndexError, match=r"task index must be in 0\.\.1"):
        km.set_score(1, 2, 0.5)
    with pytest.raises(ValueError, match="finite"):
        km.set_score(1, "A", math.nan)
    with pytest.raises(ValueError, match="unique"):
        KnowledgeMatrix(["A", "A"])
    with pytest.raises(ValueError, match="lacks key"):
        KnowledgeMatrix.from_dict({"tasks": ["A"], "R": [[0.1], [0.2]]})
    with pytest.raises(ValueError, match="3 tasks need"):
        KnowledgeMatrix.from_dict({"tasks": ["A", "B", "C"], "R": [[0.1, 0.2], [0.3, 0.4]], "old": [None, None]})

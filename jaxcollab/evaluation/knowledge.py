"""Knowledge accounting: the round-by-task score matrix and the paper's measures of what is kept and gained.

Convention. A run has `n` rounds; round `j` (1-based) adds task `j`. The score matrix `R` has shape
`(n + 1, num_tasks)` with `num_tasks >= n`:

- row 0 is the base model before any round, row `j` the model after round `j`;
- column `i` (0-based) is the task added in round `i + 1`, so the task of round `j` is column `j - 1`;
- an entry that was not evaluated is NaN.

With 1-based task numbers as in DESIGN.md (`R[j, i]` = score on task i after round j), for j = 1..n:

    new_j    = R[j, j]                            current task, right after learning it
    recent_j = mean_{i<j} R[j, i]                 tasks of earlier rounds (undefined for j = 1)
    old_j    = old[j]                             old-knowledge suite (MMLU, ARC-C, ...) after round j
    OP_j     = mean_{i<=j} R[j, i]                overall performance on every task seen so far
    BWT_j    = mean_{i<j} (R[j, i] - R[i, i])     backward transfer (undefined for j = 1)

In array terms `new_j` is `R[j, j - 1]`. A measure is NaN when any entry it needs is NaN: a mean over
whatever happens to be evaluated would silently change its meaning. `summarize` writes NaN as None so
that the result is strict JSON, and every function here reads None in R or `old` back as NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

MEASURES = ("new", "recent", "old", "op", "bwt")


def _as_matrix(R: ArrayLike) -> np.ndarray:
    """R as a float64 array, checked against the (num_rounds + 1, num_tasks >= num_rounds) convention."""
    matrix = np.asarray(_none_to_nan(R), dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"R must be 2-D with shape (num_rounds + 1, num_tasks); got shape {matrix.shape}")
    num_rounds, num_tasks = matrix.shape[0] - 1, matrix.shape[1]
    if num_rounds < 0:
        raise ValueError("R needs at least row 0 (the base model's scores); got an empty matrix")
    if num_tasks < num_rounds:
        raise ValueError(
            f"R has {num_rounds + 1} rows (base + {num_rounds} rounds) but only {num_tasks} task columns; "
            f"round j adds task j, so it needs at least {num_rounds} columns"
        )
    if np.isinf(matrix).any():
        raise ValueError(f"R has infinite entries at (round, task) {np.argwhere(np.isinf(matrix)).tolist()}")
    return matrix


def new_knowledge(R: ArrayLike) -> np.ndarray:
    """new_j = score on task j right after round j, for j = 1..n."""
    matrix = _as_matrix(R)
    rounds = np.arange(1, matrix.shape[0])
    return matrix[rounds, rounds - 1]


def recent_knowledge(R: ArrayLike) -> np.ndarray:
    """recent_j = mean score after round j on the tasks of rounds 1..j-1 (NaN for j = 1)."""
    matrix = _as_matrix(R)
    return np.array([matrix[j, : j - 1].mean() if j > 1 else np.nan for j in range(1, matrix.shape[0])])


def overall_performance(R: ArrayLike) -> np.ndarray:
    """OP_j = mean score after round j on the tasks of rounds 1..j."""
    matrix = _as_matrix(R)
    return np.array([matrix[j, :j].mean() for j in range(1, matrix.shape[0])])


def backward_transfer(R: ArrayLike) -> np.ndarray:
    """BWT_j = mean over earlier tasks i of (score after round j - score right after round i); NaN for j = 1."""
    matrix = _as_matrix(R)
    learned = new_knowledge(matrix)  # learned[i - 1] = R[i, i] in 1-based task numbers
    return np.array(
        [(matrix[j, : j - 1] - learned[: j - 1]).mean() if j > 1 else np.nan for j in range(1, matrix.shape[0])]
    )


def old_knowledge(R: ArrayLike, old: ArrayLike | None) -> np.ndarray:
    """old_j for j = 1..n from the old-knowledge vector `old` (length n + 1, entry 0 = the base model)."""
    rounds = _as_matrix(R).shape[0] - 1
    if old is None:
        return np.full(rounds, np.nan)
    vector = _as_old(old, rounds)
    return vector[1:]


def _as_old(old: ArrayLike, rounds: int) -> np.ndarray:
    vector = np.asarray(_none_to_nan(old), dtype=np.float64)
    if vector.shape != (rounds + 1,):
        raise ValueError(
            f"old must have one score per model, base included: shape ({rounds + 1},) for {rounds} rounds; "
            f"got shape {vector.shape}"
        )
    return vector


def _json_floats(values: ArrayLike) -> Any:
    """Python floats (nested lists for arrays), NaN -> None."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        value = float(array)
        return None if math.isnan(value) else value
    return [_json_floats(row) for row in array]


def summarize(R: ArrayLike, old: ArrayLike | None = None) -> dict[str, Any]:
    """All knowledge measures of one strategy, JSON-ready (NaN -> None).

    Returns `{"rounds": [1..n], "new", "recent", "old", "op", "bwt"}` (lists of length n, over rounds
    1..n), `"old_base"` (old[0], the base model; None without `old`) and `"R"` (the full matrix).
    """
    matrix = _as_matrix(R)
    rounds = matrix.shape[0] - 1
    old_vector = np.full(rounds + 1, np.nan) if old is None else _as_old(old, rounds)
    return {
        "rounds": list(range(1, rounds + 1)),
        "new": _json_floats(new_knowledge(matrix)),
        "recent": _json_floats(recent_knowledge(matrix)),
        "old": _json_floats(old_vector[1:]),
        "op": _json_floats(overall_performance(matrix)),
        "bwt": _json_floats(backward_transfer(matrix)),
        "old_base": _json_floats(old_vector[0]),
        "R": _json_floats(matrix),
    }


class KnowledgeMatrix:
    """Scores of one strategy filled in as rounds finish: `R` over named tasks plus the old-knowledge vector.

    One round per task by default (round j adds `tasks[j - 1]`); every entry starts as NaN.

        km = KnowledgeMatrix(["C-STANCE", "FOMC"])
        km.set_score(0, "FOMC", 0.41)       # base model on FOMC
        km.set_old(0, 0.63)
        km.summary()                        # the measures, JSON-ready
        KnowledgeMatrix.from_json(km.to_json())
    """

    def __init__(self, tasks: Sequence[str], num_rounds: int | None = None) -> None:
        self.tasks = [str(task) for task in tasks]
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"task names must be unique; got {self.tasks}")
        rounds = len(self.tasks) if num_rounds is None else num_rounds
        if not 0 <= rounds <= len(self.tasks):
            raise ValueError(f"num_rounds must be in 0..{len(self.tasks)} (one task per round); got {rounds}")
        self.R = np.full((rounds + 1, len(self.tasks)), np.nan)
        self.old = np.full(rounds + 1, np.nan)

    @property
    def num_rounds(self) -> int:
        return self.R.shape[0] - 1

    def _round(self, round_index: int) -> int:
        if not 0 <= round_index <= self.num_rounds:
            raise IndexError(f"round must be in 0..{self.num_rounds} (0 = the base model); got {round_index}")
        return round_index

    def _task(self, task: str | int) -> int:
        if isinstance(task, str):
            if task not in self.tasks:
                raise KeyError(f"unknown task {task!r}; tasks: {', '.join(self.tasks)}")
            return self.tasks.index(task)
        if not 0 <= task < len(self.tasks):
            raise IndexError(f"task index must be in 0..{len(self.tasks) - 1}; got {task}")
        return task

    def set_score(self, round_index: int, task: str | int, value: float) -> None:
        """Score on `task` (name or 0-based column) of the model after round `round_index` (0 = base)."""
        self.R[self._round(round_index), self._task(task)] = _finite(value, "score")

    def set_old(self, round_index: int, value: float) -> None:
        """Old-knowledge score of the model after round `round_index` (0 = base)."""
        self.old[self._round(round_index)] = _finite(value, "old-knowledge score")

    def summary(self) -> dict[str, Any]:
        return summarize(self.R, self.old)

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "R": _json_floats(self.R), "old": _json_floats(self.old)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnowledgeMatrix:
        missing = {"tasks", "R", "old"} - set(data)
        if missing:
            raise ValueError(f"knowledge matrix data lacks key(s) {sorted(missing)}; it needs tasks, R and old")
        R = _as_matrix(data["R"])
        km = cls(data["tasks"], num_rounds=R.shape[0] - 1)
        if R.shape != km.R.shape:
            raise ValueError(f"R has shape {R.shape} but {len(km.tasks)} tasks need {km.R.shape}")
        km.R = R
        km.old = _as_old(data["old"], km.num_rounds)
        return km

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> KnowledgeMatrix:
        return cls.from_dict(json.loads(text))


def _finite(value: float, what: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number; got {value!r}")
    return number


def _none_to_nan(values: Any) -> Any:
    """Inverse of `_json_floats` for lists: None -> NaN in (nested lists of) numbers; arrays pass through."""
    if isinstance(values, (list, tuple)):
        return [_none_to_nan(value) for value in values]
    return math.nan if values is None else values

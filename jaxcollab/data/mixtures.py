"""Training mixtures for the fully-collaborative setting: joint training on a union, and replay.

- `joint_mixture(datasets, duplication=k)`: the union of the training sets of tasks 1..j, each repeated
  `k` times (an int for all, or one factor per dataset: the paper's per-dataset duplication option),
  shuffled with a seed.
- `replay_mixture(current, earlier, w_hist=0.1)`: the current task's training set in full plus
  `replay_size(len(current), w_hist) = round(w_hist * len(current))` examples from EACH earlier training
  set, shuffled together. The examples of earlier set i are the first `n` entries of a seeded permutation
  of it, taken with wrap-around (`perm[arange(n) % len(set_i)]`), so a set smaller than `n` is used whole,
  repeatedly, before any example appears a third time. `round` is Python's (halves go to the even
  integer: round(2.5) == 2). Each earlier set has its own permutation (seeded by `(seed, i)`); pass a
  different `seed` each round to draw fresh replay samples.

Inputs are `datasets.Dataset`s or lists of `{"prompt", "answer"}` dicts; outputs are in-memory
`datasets.Dataset`s with columns `prompt`, `answer` and `source` (the index of the input dataset an
example came from: for replay 0 is the current set and i >= 1 is `earlier[i - 1]`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np

__all__ = ["joint_mixture", "replay_indices", "replay_mixture", "replay_size"]

DEFAULT_W_HIST = 0.1


def _as_dataset(examples: Any, name: str) -> datasets.Dataset:
    if isinstance(examples, datasets.Dataset):
        ds = examples
    elif isinstance(examples, Sequence) and all(isinstance(row, Mapping) for row in examples):
        if not examples:
            raise ValueError(f"{name}: empty dataset")
        ds = datasets.Dataset.from_list([{"prompt": row["prompt"], "answer": row["answer"]} for row in examples])
    else:
        raise TypeError(f"{name}: expected a datasets.Dataset or a list of {{'prompt', 'answer'}} dicts, "
                        f"got {type(examples).__name__}")
    missing = {"prompt", "answer"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{name}: missing column(s) {sorted(missing)} (columns: {ds.column_names})")
    if len(ds) == 0:
        raise ValueError(f"{name}: empty dataset")
    return ds


def _gather(parts: Sequence[tuple[datasets.Dataset, np.ndarray]], seed: int, shuffle: bool) -> datasets.Dataset:
    """Rows `indices` of each dataset, concatenated, tagged with `source`, optionally shuffled (in memory)."""
    prompts: list[str] = []
    answers: list[str] = []
    sources: list[int] = []
    for source, (ds, indices) in enumerate(parts):
        ds_prompts, ds_answers = list(ds["prompt"]), list(ds["answer"])
        prompts += [ds_prompts[i] for i in indices]
        answers += [ds_answers[i] for i in indices]
        sources += [source] * len(indices)
    order = np.random.default_rng(seed).permutation(len(prompts)) if shuffle else np.arange(len(prompts))
    return datasets.Dataset.from_dict(
        {"prompt": [prompts[i] for i in order], "answer": [answers[i] for i in order],
         "source": [sources[i] for i in order]},
        features=datasets.Features({"prompt": datasets.Value("string"), "answer": datasets.Value("string"),
                                    "source": datasets.Value("int32")}),
    )


def joint_mixture(train_sets: Sequence[Any], *, duplication: int | Sequence[int] = 1, seed: int = 0,
                  shuffle: bool = True) -> datasets.Dataset:
    """The union of `train_sets`, dataset i repeated `duplication[i]` times, shuffled with `seed`."""
    if not train_sets:
        raise ValueError("joint_mixture needs at least one dataset")
    factors = [duplication] * len(train_sets) if isinstance(duplication, int) else list(duplication)
    if len(factors) != len(train_sets):
        raise ValueError(f"duplication has {len(factors)} factors for {len(train_sets)} datasets")
    if any(int(k) != k or k < 1 for k in factors):
        raise ValueError(f"duplication factors must be integers >= 1, got {factors}")
    parts = []
    for i, (examples, k) in enumerate(zip(train_sets, factors, strict=True)):
        ds = _as_dataset(examples, f"dataset {i}")
        parts.append((ds, np.tile(np.arange(len(ds)), int(k))))
    return _gather(parts, seed, shuffle)


def replay_size(current_size: int, w_hist: float = DEFAULT_W_HIST) -> int:
    """Examples replayed from EACH earlier dataset: round(w_hist * current_size)."""
    if w_hist < 0:
        raise ValueError(f"w_hist must be >= 0, got {w_hist}")
    return round(w_hist * current_size)


def replay_indices(dataset_size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices into a dataset of `dataset_size`: a permutation, wrapped around if `count` is larger."""
    if dataset_size <= 0:
        raise ValueError("cannot replay from an empty dataset")
    return rng.permutation(dataset_size)[np.arange(count) % dataset_size]


def replay_mixture(current: Any, earlier: Sequence[Any], *, w_hist: float = DEFAULT_W_HIST, seed: int = 0,
                   shuffle: bool = True) -> datasets.Dataset:
    """All of `current` plus `replay_size(len(current), w_hist)` examples from each of `earlier`, shuffled."""
    current_ds = _as_dataset(current, "current dataset")
    count = replay_size(len(current_ds), w_hist)
    parts = [(current_ds, np.arange(len(current_ds)))]
    for i, examples in enumerate(earlier):
        ds = _as_dataset(examples, f"earlier dataset {i}")
        parts.append((ds, replay_indices(len(ds), count, np.random.default_rng([seed, i]))))
    return _gather(parts, seed, shuffle)

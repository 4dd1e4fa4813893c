"""Model merging as pure pytree functions: averaging, task arithmetic, TIES, DARE, magnitude pruning.

Every method is one generalized task-arithmetic merge, applied tensor by tensor (mergekit's design,
`mergekit/merge_methods/generalized_task_arithmetic.py`):

    tau_i   = x_i - base                      task vectors (x_i: a model's tensor, or a LoRA factor)
    tau_i   = sparsify(tau_i)                 magnitude top-k per tensor, or DARE random drop + 1/density
    v_i     = w_i * tau_i                     weighted
    elected = sign(sum_i s_i)  (>= 0 -> +1)   "total" (s_i = the task values) or "frequency" (s_i = signs)
    m_i     = sign(s_i) == elected            entries that agree with the elected sign (zeros never agree)
    merged  = sum_i m_i v_i / divisor         divisor: 1, sum_i w_i m_i (mergekit) or sum_i m_i (PEFT)
    result  = base + scale * merged

A `MergeRecipe` names one choice of each step; `full_model_recipe` and `adapter_recipe` map the method
names to recipes.

Two semantics, both offered and named:

1. **Full task vectors** (mergekit; `merge`): `tau_i = W_i - W_base` for every parameter, merged and
   added back to the base. Conventions of mergekit 0.1.5 (`registry.py`, `GeneralizedTaskArithmeticMerge.
   merge_group`, `get_mask`, `sparsify.magnitude`):

   | method            | sparsify           | sign election       | combine                              |
   |-------------------|--------------------|---------------------|--------------------------------------|
   | `average`         | -                  | -                   | sum_i w_i W_i / sum_i w_i (no base)  |
   | `task_arithmetic` | -                  | -                   | base + scale * sum_i w_i tau_i       |
   | `ties`            | top-k (k>=1)       | on w_i tau_i        | base + sum m_i w_i tau_i / sum m_i w_i |
   | `dare_linear`     | random, 1/density  | -                   | base + sum_i w_i tau_i               |
   | `dare_ties`       | random, 1/density  | on w_i tau_i        | base + sum m_i w_i tau_i (no divisor) |
   | `magnitude_prune` | top-k (k>=1)       | -                   | base + sum_i w_i tau_i               |
   | `breadcrumbs`     | drop top gamma=1%, keep density below | -  | base + sum_i w_i tau_i               |
   | `della`           | per row, p by rank, L1 kept | on w_i tau_i | base + sum m_i w_i tau_i / sum m_i w_i |

   `della` (DELLA's MagPrune) keeps each entry with probability density - 0.15 for the smallest
   magnitude of its row up to density + 0.15 for the largest, then rescales the kept entries so each tensor
   keeps its L1 norm (mergekit's convention; DELLA's paper divides by each entry's probability). Rows are
   the Hugging Face tensor's rows, so for kernels, stored transposed here, they are columns (`leaf_rows`).

   `average` is the paper's "Averaging" (uniform mean of all parameters; mergekit's `linear`); with
   equal weights it equals task arithmetic with weights 1/n up to rounding. `normalize` overrides whether
   the sum is divided by the weights (mergekit's `normalize` parameter); `scale` is mergekit's `lambda`.
   Top-k keeps `max(1, int(density * numel))` entries of each tensor. Weights default to 1.0 each.
   One difference from mergekit 0.1.5: its DARE rescales the kept entries to the L1 norm of the task
   vector (`rescaled_masked_tensor`); here they are scaled by 1/density as in the DARE paper and PEFT,
   which keeps DARE unbiased.

2. **LoRA factors merged separately** (PEFT's `LoraModel.add_weighted_adapter`, non-SVD path, which the
   paper used; `merge_adapters`): per target module, the A factors of the adapters that have it are merged
   with weights sign(w s) * sqrt(|w s|) and the B factors with sqrt(|w s|) (w: the adapter's weight,
   s: its scaling), with no base (`peft/utils/merge_utils.py`):

   | method            | sparsify            | sign election        | combine                          |
   |-------------------|---------------------|----------------------|----------------------------------|
   | `linear`          | -                   | -                    | sum_i w_i x_i                    |
   | `ties`            | top-k (k = int(d n))| on unweighted x_i    | sum m_i w_i x_i / max(sum m_i, 1) |
   | `dare_linear`     | random, 1/density   | -                    | sum_i w_i x_i                    |
   | `dare_ties`       | random, 1/density   | on unweighted x_i    | sum m_i w_i x_i / max(sum m_i, 1) |
   | `magnitude_prune` | top-k (k = int(d n))| -                    | sum_i w_i x_i                    |
   | `cat`             | A_i * w_i s_i and B_i concatenated along the rank (exact: sum of the w_i deltas)  |

   The merged adapter has scaling 1 (PEFT sets lora_alpha = r). As in PEFT, all adapters must share one
   rank except for `cat` (whose rank is the sum, zero-padded where an adapter lacks a target), and a
   single adapter is always combined with `linear`. The result is not the merge of the task vectors
   `s B A` (the product of merged factors has cross terms); that is semantics 1 applied to
   `lora.fold(base, adapter)` for each adapter.

Density defaults to `DEFAULT_DENSITY` = 0.2 for the sparsifying methods (TIES's k = 20%, the paper's
setting via PEFT); density >= 1 skips sparsification as in both libraries. Parameters stacked over
layers (leaves under the top-level key "layers", shape [L, ...]) are sparsified per layer, exactly as the
per-layer tensors of a Hugging Face checkpoint.

Everything is pure and traceable: leaves are merged one at a time by a jitted function (memory stays
about n + 2 copies of the largest leaf), accumulation is float32 (or wider) whatever the input dtype,
results are cast back to the input dtype and placed with the input's sharding. DARE draws its masks from
an explicit key: `seed` (an int or a `jax.random` key), folded with a hash of each leaf's path and then
with the model index, so a leaf's mask does not depend on the order or the set of other leaves.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxcollab.lora import ALL_TARGETS, TARGET_PATHS, LoraAdapter
from jaxcollab.trees import set_path

SIGN_METHODS = ("total", "frequency")
DEFAULT_DENSITY = 0.2
STACKED_KEY = "layers"

Sparsify = Literal["magnitude", "random", "outliers", "della"] | None


@dataclasses.dataclass(frozen=True)
class FullModelMethod:
    """A merge method on full task vectors: its steps, with mergekit's defaults (module docstring).

    sparsify: None, "magnitude" (top-k), "random" (DARE), "outliers" (Model Breadcrumbs: the `gamma`
    fraction of largest magnitudes dropped, then the smallest, down to `density`) or "della" (DELLA's
    MagPrune: in each row of the tensor, entry kept with probability density - epsilon .. density + epsilon
    rising with its magnitude's rank; the kept rescaled to the tensor's L1 norm). consensus: TIES's sign
    election. normalize: divide by the (agreeing) weights unless the caller says otherwise.
    """

    sparsify: Sparsify = None
    consensus: bool = False
    normalize: bool = False
    gamma: float = 0.0
    epsilon: float = 0.0


# The full-model methods. A new one is one entry here (and a reference test against mergekit).
FULL_MODEL_METHODS: dict[str, FullModelMethod] = {
    "average": FullModelMethod(normalize=True),  # of the models themselves: no base (see `merge`)
    "task_arithmetic": FullModelMethod(),
    "ties": FullModelMethod("magnitude", consensus=True, normalize=True),
    "dare_linear": FullModelMethod("random"),
    "dare_ties": FullModelMethod("random", consensus=True),
    "magnitude_prune": FullModelMethod("magnitude"),
    "breadcrumbs": FullModelMethod("outliers", gamma=0.01),
    "della": FullModelMethod("della", consensus=True, normalize=True, epsilon=0.15),
}
METHODS = tuple(FULL_MODEL_METHODS)
ADAPTER_METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SPARSIFYING_METHODS = tuple(name for name, m in FULL_MODEL_METHODS.items() if m.sparsify)  # take --density
RANDOM_METHODS = tuple(name for name, m in FULL_MODEL_METHODS.items() if m.sparsify in ("random", "della"))
Consensus = Literal["total", "frequency"] | None
Divisor = Literal["weights", "count"] | None


class MergeError(ValueError):
    """Models, adapters or options that cannot be merged."""


@dataclasses.dataclass(frozen=True)
class MergeRecipe:
    """One point of the generalized task-arithmetic merge (see the module docstring).

    sparsify: None, "magnitude" (top-k by |value| per tensor), "random" (DARE: keep with probability
    `density`, divide the kept by `density`), "outliers" (Model Breadcrumbs: of the entries sorted by
    |value|, keep int(density n) just below the top int(gamma n), fewer dropped at the top if needed) or
    "della" (see `FullModelMethod`). consensus: None or the sign election, "total" (sign of the sum) or
    "frequency" (majority of signs).
    elect_on_weighted: elect and mask on w_i tau_i (mergekit) or on tau_i (PEFT). divide_by: None
    (weighted sum), "weights" (sum of the weights of the agreeing entries, or of all weights without
    consensus; mergekit's normalize) or "count" (number of agreeing entries; PEFT's disjoint merge).
    keep_at_least_one: top-k keeps max(1, k) (mergekit) or k (PEFT) entries.
    """

    sparsify: Sparsify = None
    density: float = 1.0
    consensus: Consensus = None
    elect_on_weighted: bool = True
    divide_by: Divisor = None
    keep_at_least_one: bool = True
    scale: float = 1.0
    gamma: float = 0.0  # "outliers": the fraction of largest magnitudes dropped first
    epsilon: float = 0.0  # "della": keep probabilities span density - epsilon .. density + epsilon

    def __post_init__(self) -> None:
        if self.sparsify not in (None, "magnitude", "random", "outliers", "della"):
            raise MergeError(f"sparsify={self.sparsify!r}; choose None, 'magnitude', 'random', 'outliers' or"
                             " 'della'")
        if self.sparsify == "della" and self.density < 1.0 and not (
                self.density - self.epsilon > 0.0 and self.density + self.epsilon < 1.0):
            raise MergeError(f"della needs density - epsilon and density + epsilon in (0, 1); got density"
                             f" {self.density} and epsilon {self.epsilon}")
        if self.consensus not in (None, *SIGN_METHODS):
            raise MergeError(f"consensus={self.consensus!r}; choose None, 'total' or 'frequency'")
        if self.divide_by not in (None, "weights", "count"):
            raise MergeError(f"divide_by={self.divide_by!r}; choose None, 'weights' or 'count'")
        _check_density(self.density)


# --------------------------------------------------------------------------------------------- validation
def _check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float, np.floating)):
        raise MergeError(f"density must be a number in (0, 1], got {density!r}")
    density = float(density)
    if not (0.0 < density <= 1.0):
        raise MergeError(
            f"density must be in (0, 1] (the fraction of each task vector kept), got {density}"
        )
    return density


def _check_method(method: str, valid: tuple[str, ...], what: str) -> None:
    if method not in valid:
        raise MergeError(f"unknown {what} method {method!r}; valid methods: {', '.join(valid)}")


def _check_sign_method(majority_sign_method: str) -> None:
    if majority_sign_method not in SIGN_METHODS:
        raise MergeError(
            f"majority_sign_method={majority_sign_method!r}; choose 'total' (sign of the sum) or"
            " 'frequency' (majority of signs)"
        )


def check_weights(weights: Sequence[float] | None, n: int, what: str) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in np.asarray(weights, dtype=np.float64).reshape(-1)]
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} {what}; give one weight per {what[:-1]}")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"weights must be finite numbers, got {weights}")
    return weights


def _path_str(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _flat(tree: Any) -> list[tuple[str, Any]]:
    return [(_path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_same_structure(reference: Any, ref_name: str, trees: Sequence[Any], names: Sequence[str]) -> None:
    """Every tree has the reference's parameters with the same shapes; name the first that differs."""
    ref = dict(_flat(reference))
    for tree, name in zip(trees, names, strict=True):
        if not isinstance(tree, dict):
            raise MergeError(f"{name} is a {type(tree).__name__}, not a parameter tree (a nested dict of arrays)")
        got = dict(_flat(tree))
        for path, leaf in ref.items():
            if path not in got:
                raise MergeError(
                    f"{name} has no parameter '{path}' (shape {tuple(np.shape(leaf))} in {ref_name}); models"
                    " must have the same architecture"
                )
            if tuple(np.shape(got[path])) != tuple(np.shape(leaf)):
                raise MergeError(
                    f"parameter '{path}' has shape {tuple(np.shape(got[path]))} in {name} but"
                    f" {tuple(np.shape(leaf))} in {ref_name}; models must have the same architecture"
                )
        extra = [p for p in got if p not in ref]
        if extra:
            raise MergeError(
                f"{name} has parameter '{extra[0]}' (shape {tuple(np.shape(got[extra[0]]))}) that {ref_name}"
                " lacks; models must have the same architecture"
            )


def as_key(seed: int | jax.Array) -> jax.Array:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(int(seed))
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    if isinstance(seed, jax.Array) and seed.dtype == jnp.uint32 and seed.shape[-1:] == (2,):
        return jax.random.wrap_key_data(seed)
    raise MergeError(f"seed must be an int or a jax.random key, got {type(seed).__name__}")


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


# ------------------------------------------------------------------------------------ the per-tensor merge
def _accumulation_dtype(dtype: Any) -> Any:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise MergeError(f"only floating-point parameters can be merged, got {dtype}")
    return jnp.promote_types(dtype, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Rows:
    """Where a tensor's rows lie, for methods that work row by row (della): rows of `length` entries
    along the last axis, or along the second-to-last when `transposed` (a Flax kernel [in, out] holds the
    rows [out, in] of the Hugging Face tensor in its columns)."""

    length: int
    transposed: bool = False


def leaf_rows(path_name: str, shape: tuple[int, ...]) -> Rows:
    """The Hugging Face rows of a parameter of jaxcollab's tree: kernels are stored transposed."""
    if path_name.split("/")[-1] == "kernel" and len(shape) >= 2:
        return Rows(shape[-2], transposed=True)
    return Rows(shape[-1] if shape else 1)


def della_keep_probabilities(rows: jax.Array, density: float, epsilon: float) -> jax.Array:
    """DELLA's MagPrune probabilities for `rows` [n, size]: density - epsilon for the smallest magnitude of a
    row up to density + epsilon for the largest, linear in the rank (mergekit's `della_magprune`)."""
    ranks = jnp.argsort(jnp.argsort(jnp.abs(rows), axis=1), axis=1).astype(jnp.float32) + 1
    low, high = jnp.min(ranks, axis=1, keepdims=True), jnp.max(ranks, axis=1, keepdims=True)
    rank_norm = jnp.clip((ranks - low) / jnp.maximum(high - low, 1.0), 0.0, 1.0)
    return (density - epsilon) + rank_norm * 2 * epsilon


def _keep(key: jax.Array, probabilities: jax.Array) -> jax.Array:
    return jax.random.bernoulli(key, probabilities)


def _della(tau: jax.Array, recipe: MergeRecipe, key: jax.Array, stacked: bool, layout: Rows) -> jax.Array:
    """DELLA's MagPrune on one task tensor (each layer slice of a stacked leaf is one tensor): entries kept
    with their rank's probability, the kept rescaled so each tensor keeps its L1 norm (mergekit)."""
    view = jnp.swapaxes(tau, -1, -2) if layout.transposed else tau
    flat = view.reshape(-1, layout.length)
    probabilities = della_keep_probabilities(flat.astype(jnp.float32), recipe.density, recipe.epsilon)
    kept = jnp.where(_keep(key, probabilities), flat, jnp.zeros((), tau.dtype)).reshape(view.shape)
    kept = jnp.swapaxes(kept, -1, -2) if layout.transposed else kept
    tensors = tau.shape[0] if stacked else 1
    before = jnp.sum(jnp.abs(tau.reshape(tensors, -1)), axis=1)
    after = jnp.sum(jnp.abs(kept.reshape(tensors, -1)), axis=1)
    eps = 1e-7
    factor = jnp.where((before < eps) | (after < eps), 1.0, before / jnp.where(after < eps, 1.0, after))
    return (kept.reshape(tensors, -1) * factor[:, None].astype(tau.dtype)).reshape(tau.shape)


def _sparsify(tau: jax.Array, index: int, recipe: MergeRecipe, key: jax.Array, stacked: bool,
              layout: Rows | None) -> jax.Array:
    """Model `index`'s task tensor, sparsified as a whole (or layer slice by layer slice when `stacked`)."""
    if recipe.sparsify is None or recipe.density >= 1.0:
        return tau
    if recipe.sparsify == "random":
        keep = jax.random.bernoulli(jax.random.fold_in(key, index), recipe.density, tau.shape)
        return jnp.where(keep, tau / jnp.asarray(recipe.density, tau.dtype), jnp.zeros((), tau.dtype))
    if recipe.sparsify == "della":
        return _della(tau, recipe, jax.random.fold_in(key, index), stacked, layout or Rows(tau.shape[-1]))
    # magnitude: keep the k largest |values| of the tensor (of every layer's slice of a stacked leaf)
    rows = tau.reshape(tau.shape[0] if stacked else 1, -1)
    size = rows.shape[1]
    if recipe.sparsify == "outliers":
        return jnp.where(_outliers_mask(rows, recipe.density, recipe.gamma), rows,
                         jnp.zeros((), tau.dtype)).reshape(tau.shape)
    k = int(recipe.density * size)
    if recipe.keep_at_least_one:
        k = max(1, k)
    if k >= size:
        return tau
    if k == 0:
        return jnp.zeros_like(tau)
    return jnp.where(top_magnitude_mask(rows, k), rows, jnp.zeros((), tau.dtype)).reshape(tau.shape)


def _outliers_mask(rows: jax.Array, density: float, gamma: float) -> jax.Array:
    """Model Breadcrumbs' mask per row: in ascending order of |value|, ranks [bottom, bottom + kept), where
    kept = int(density n), bottom = max(0, n - kept - int(gamma n)) (mergekit's `magnitude_outliers`)."""
    size = rows.shape[1]
    kept = int(density * size)
    bottom = max(0, size - kept - int(gamma * size))

    def top(k: int) -> jax.Array:  # the k largest |values| of each row, for any 0 <= k <= size
        if k <= 0:
            return jnp.zeros(rows.shape, bool)
        return jnp.ones(rows.shape, bool) if k >= size else top_magnitude_mask(rows, k)

    return top(size - bottom) & ~top(size - bottom - kept)


_SAMPLE = 1 << 16  # entries per row whose order statistics bracket the k-th largest magnitude


def top_magnitude_mask(rows: jax.Array, k: int) -> jax.Array:
    """Boolean mask of the `k` largest |values| of every row of `rows` [n, size] (1 <= k <= size).

    Entries tied with the k-th largest magnitude are kept lowest index first, as `jax.lax.top_k` orders
    them. Instead of sorting, the k-th largest magnitude is found by bisecting its bit pattern (the bits of
    a non-negative IEEE float order like the float), each step one counting pass over the row: linear in
    the row, where the top-k of a fifth of a row costs a sort (16x faster for 4 x 8.2M float32 on a CPU).
    The bisection starts from a bracket read off a strided sample of the row, used only where two counting
    passes confirm it, which takes it from 31 steps (float32) to about 20.
    """
    n, size = rows.shape
    nbits = jnp.dtype(rows.dtype).itemsize * 8
    int_type = {32: jnp.int32, 64: jnp.int64}[nbits]
    bits = jax.lax.bitcast_convert_type(jnp.abs(rows), int_type)

    def count_at_least(threshold: jax.Array) -> jax.Array:
        return jnp.sum(bits >= threshold[:, None], axis=1)

    # Invariant of the bisection: count(bits >= low) >= k > count(bits >= high).
    low = jnp.zeros(n, int_type)
    high = jnp.full(n, jnp.iinfo(int_type).max, int_type)
    stride = size // _SAMPLE
    if stride > 1:
        sample = -jnp.sort(-bits[:, ::stride], axis=1)  # descending
        rank = k * sample.shape[1] / size
        margin = 6.0 * math.sqrt(rank * (1 - rank / sample.shape[1])) + 2
        upper = sample[:, max(int(rank - margin), 0)]
        lower = sample[:, min(int(rank + margin), sample.shape[1] - 1)]
        high = jnp.where(count_at_least(upper) < k, upper, high)
        low = jnp.where(count_at_least(lower) >= k, lower, low)

    def bisect(bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        low, high = bounds
        mid = low + (high - low) // 2
        enough = count_at_least(mid) >= k
        return jnp.where(enough, mid, low), jnp.where(enough, high, mid)

    threshold, _ = jax.lax.while_loop(lambda b: jnp.any(b[1] - b[0] > 1), bisect, (low, high))
    threshold = threshold[:, None]
    above = bits > threshold
    tied = bits == threshold
    room = k - jnp.sum(above, axis=1)  # >= 1, and at most the number of tied entries
    return above | _first_true(tied, room)


_BLOCK = 4096


def _first_true(flags: jax.Array, count: jax.Array) -> jax.Array:
    """`flags` [n, size] with only its first `count[i]` True entries of row i kept (1 <= count[i] <= the
    row's True entries). Blockwise: a pass counts each block's entries, and only the block where the
    count is reached is scanned entry by entry (a cumulative sum over whole rows is far slower on a CPU)."""
    n, size = flags.shape
    padded = jnp.pad(flags, ((0, 0), (0, -size % _BLOCK)))
    blocks = padded.reshape(n, -1, _BLOCK)
    per_block = jnp.sum(blocks, axis=2, dtype=jnp.int32)
    before = jnp.cumsum(per_block, axis=1) - per_block  # True entries in the blocks before each block
    last_block = jnp.sum(before < count[:, None], axis=1) - 1  # the block holding the count-th True entry
    still_needed = count - jnp.take_along_axis(before, last_block[:, None], axis=1)[:, 0]
    block = jnp.take_along_axis(blocks, last_block[:, None, None], axis=1)[:, 0]  # [n, _BLOCK]
    offset = jnp.sum(jnp.cumsum(block, axis=1, dtype=jnp.int32) < still_needed[:, None], axis=1)
    cutoff = last_block * _BLOCK + offset  # index of the count-th True entry
    return flags & (jnp.arange(size)[None, :] <= cutoff[:, None])


def _sum(terms: Sequence[jax.Array]) -> jax.Array:
    return functools.reduce(jnp.add, terms)


def _combine(taus: Sequence[jax.Array], weights: jax.Array, recipe: MergeRecipe) -> jax.Array:
    """The sparsified task tensors of the models -> the merged task tensor (before scale).

    Written over the list of tensors, never a stacked [n, ...] array: XLA fuses the per-entry sums over
    models into one pass, where reductions over a leading model axis run far slower on a CPU.
    """
    dtype = taus[0].dtype
    w = [weights[i].astype(dtype) for i in range(len(taus))]
    weighted = [tau * wi for tau, wi in zip(taus, w, strict=True)]
    if recipe.consensus is not None:
        sources = weighted if recipe.elect_on_weighted else list(taus)
        signs = [jnp.sign(source) for source in sources]
        score = _sum(sources) if recipe.consensus == "total" else _sum(signs)
        elected = jnp.where(score >= 0, 1.0, -1.0).astype(dtype)
        agree = [sign == elected for sign in signs]
        merged = _sum([jnp.where(a, v, 0.0) for a, v in zip(agree, weighted, strict=True)])
        if recipe.divide_by == "weights":
            divisor = _sum([jnp.where(a, wi, 0.0) for a, wi in zip(agree, w, strict=True)])
            merged = merged / jnp.where(divisor == 0, 1.0, divisor)
        elif recipe.divide_by == "count":
            merged = merged / jnp.maximum(_sum([a.astype(jnp.int32) for a in agree]), 1).astype(dtype)
        return merged
    merged = _sum(weighted)
    if recipe.divide_by == "weights":
        total = _sum(w)
        merged = merged / jnp.where(jnp.abs(total) < 1e-8, 1.0, total)
    elif recipe.divide_by == "count":
        merged = merged / len(taus)
    return merged


@functools.partial(jax.jit, static_argnames=("recipe", "stacked", "layout"))
def _merge_leaf(base: jax.Array | None, models: tuple[jax.Array, ...], weights: jax.Array, key: jax.Array,
                *, recipe: MergeRecipe, stacked: bool, layout: Rows | None) -> jax.Array:
    out_dtype = (base if base is not None else models[0]).dtype
    acc = _accumulation_dtype(out_dtype)
    taus = [m.astype(acc) - base.astype(acc) if base is not None else m.astype(acc) for m in models]
    taus = [_sparsify(tau, i, recipe, key, stacked, layout) for i, tau in enumerate(taus)]
    merged = _combine(taus, weights, recipe)
    if recipe.scale != 1.0:
        merged = merged * jnp.asarray(recipe.scale, acc)
    if base is not None:
        merged = base.astype(acc) + merged
    return merged.astype(out_dtype)


def _place_like(value: jax.Array, reference: Any) -> jax.Array:
    """Give the result the reference leaf's sharding (no-op under tracing or when already equal)."""
    concrete = not isinstance(reference, jax.core.Tracer) and not isinstance(value, jax.core.Tracer)
    if concrete and isinstance(reference, jax.Array) and value.sharding != reference.sharding:
        return jax.device_put(value, reference.sharding)
    return value


def merge_leaves(
    recipe: MergeRecipe, base: jax.Array | None, models: Sequence[jax.Array], weights: Sequence[float],
    key: jax.Array, *, stacked: bool = False, rows: Rows | None = None,
) -> jax.Array:
    """The generalized merge of one tensor: `base + scale * combine(sparsify(models - base))`.

    `base=None` merges the tensors themselves (no task vectors). `stacked`: the leading axis stacks
    separate tensors (layers), sparsified one by one. `rows`: where the tensor's rows lie, for the methods
    that work row by row (default: along the last axis).
    """
    w = jnp.asarray(np.asarray(weights, np.float32))
    layout = rows if recipe.sparsify == "della" else None  # only della looks at rows: one compile for the rest
    return _merge_leaf(base, tuple(models), w, key, recipe=recipe, stacked=stacked, layout=layout)


# ------------------------------------------------------------------------------------ semantics 1: models
def full_model_recipe(
    method: str, density: float | None = None, *, scale: float = 1.0, normalize: bool | None = None,
    majority_sign_method: str = "total",
) -> MergeRecipe:
    """The recipe of a method on full task vectors, with mergekit's conventions (module docstring)."""
    _check_method(method, METHODS, "merge")
    _check_sign_method(majority_sign_method)
    density = _check_density(DEFAULT_DENSITY if density is None else density)
    spec = FULL_MODEL_METHODS[method]
    divide = spec.normalize if normalize is None else normalize
    return MergeRecipe(
        sparsify=spec.sparsify, density=density if spec.sparsify else 1.0,
        consensus=majority_sign_method if spec.consensus else None, elect_on_weighted=True,
        divide_by="weights" if divide else None, keep_at_least_one=True, scale=float(scale), gamma=spec.gamma,
        epsilon=spec.epsilon,
    )


def merge(
    method: str,
    base: dict | None,
    models: Sequence[dict],
    weights: Sequence[float] | None = None,
    density: float | None = None,
    seed: int | jax.Array = 0,
    *,
    scale: float = 1.0,
    normalize: bool | None = None,
    majority_sign_method: str = "total",
    stacked_key: str | None = STACKED_KEY,
) -> dict:
    """Merge full models (parameter trees) by their task vectors `model - base` (mergekit's semantics).

    method: one of `METHODS`. weights: one per model (default 1.0 each; for `average` they are normalised).
    density: fraction kept by the sparsifying methods (default `DEFAULT_DENSITY`; ignored by `average` and
    `task_arithmetic`). seed: int or `jax.random` key for DARE. scale: mergekit's `lambda`, multiplies the
    merged task vector. normalize: divide by the (agreeing) weights; default per method (`ties`: yes).
    majority_sign_method: "total" (sign of the weighted sum) or "frequency" (majority of signs).
    `base` may be None for `average`, which does not use it. Leaves under `stacked_key` have a leading
    layer axis and are sparsified per layer. Returns a new tree with the dtypes and shardings of the base
    (of models[0] for `average`).
    """
    _check_method(method, METHODS, "merge")
    if isinstance(models, dict) or not isinstance(models, Sequence):
        raise MergeError("models must be a list of parameter trees (one per fine-tuned model)")
    if len(models) < 1:
        raise MergeError("merge needs at least one model")
    weights = check_weights(weights, len(models), "models")
    if density is not None:
        _check_density(density)
    recipe = full_model_recipe(method, density, scale=scale, normalize=normalize,
                               majority_sign_method=majority_sign_method)
    if method == "average":
        if scale != 1.0:
            raise MergeError("scale applies to task vectors; 'average' takes none (use task_arithmetic)")
        if abs(sum(weights)) < 1e-8:
            raise MergeError(f"the weights of an average must not sum to zero, got {weights}")
        reference, ref_name, others = models[0], "models[0]", models[1:]
        names = [f"models[{i}]" for i in range(1, len(models))]
        base_for_merge = None
    else:
        if base is None:
            raise MergeError(f"'{method}' merges task vectors (model - base) and needs the base model")
        reference, ref_name, others = base, "base", models
        names = [f"models[{i}]" for i in range(len(models))]
        base_for_merge = base
    if not isinstance(reference, dict):
        raise MergeError(f"{ref_name} is a {type(reference).__name__}, not a parameter tree (a nested dict)")
    _check_same_structure(reference, ref_name, others, names)

    key = as_key(seed)
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(reference)
    model_leaves = [dict(_flat(m)) for m in models]
    base_leaves = dict(_flat(base_for_merge)) if base_for_merge is not None else None
    out = []
    for path, ref_leaf in leaves_with_paths:
        path_name = _path_str(path)
        if not jnp.issubdtype(jnp.result_type(ref_leaf), jnp.floating):
            raise MergeError(f"parameter '{path_name}' has dtype {jnp.result_type(ref_leaf)}; only floating-point"
                             " parameters can be merged")
        stacked = stacked_key is not None and path_name.split("/")[0] == stacked_key
        merged = merge_leaves(recipe, base_leaves[path_name] if base_leaves is not None else None,
                              [leaves[path_name] for leaves in model_leaves], weights, leaf_key(key, path_name),
                              stacked=stacked, rows=leaf_rows(path_name, ref_leaf.shape))
        out.append(_place_like(merged, ref_leaf))
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------- semantics 2: adapters
def adapter_recipe(method: str, density: float | None = None, majority_sign_method: str = "total") -> MergeRecipe:
    """The recipe PEFT's add_weighted_adapter applies to each of the A and B factor stacks."""
    _check_method(method, ADAPTER_METHODS, "adapter merge")
    _check_sign_method(majority_sign_method)
    if method == "cat":
        raise MergeError("'cat' concatenates factors; it has no recipe")
    density = _check_density(DEFAULT_DENSITY if density is None else density)
    sparsify: Sparsify = {"ties": "magnitude", "magnitude_prune": "magnitude", "dare_linear": "random",
                          "dare_ties": "random"}.get(method)
    ties_like = method in ("ties", "dare_ties")
    return MergeRecipe(
        sparsify=sparsify, density=density if sparsify else 1.0,
        consensus=majority_sign_method if ties_like else None, elect_on_weighted=False,
        divide_by="count" if ties_like else None, keep_at_least_one=False,
    )


def _factor_weights(weights: list[float], scalings: list[float]) -> tuple[list[float], list[float]]:
    """PEFT's split of w * scaling over the two factors: A gets the sign, both get sqrt(|w * scaling|)."""
    a_weights, b_weights = [], []
    for w, s in zip(weights, scalings, strict=True):
        ws = w * s
        root = math.sqrt(abs(ws))
        a_weights.append(root if ws >= 0 else -root)
        b_weights.append(root)
    return a_weights, b_weights


def _concatenated(parts: list[tuple[jax.Array, jax.Array, float]], total_rank: int) -> dict:
    a = jnp.concatenate([(x.astype(jnp.float32) * c).astype(x.dtype) for x, _, c in parts], axis=1)
    b = jnp.concatenate([y for _, y, _ in parts], axis=2)
    pad = total_rank - a.shape[1]
    if pad:
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0)))
        b = jnp.pad(b, ((0, 0), (0, 0), (0, pad)))
    return {"lora_A": a, "lora_B": b}


def merge_adapters(
    method: str,
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    density: float | None = None,
    seed: int | jax.Array = 0,
    majority_sign_method: str = "total",
) -> LoraAdapter:
    """Merge LoRA adapters factor by factor, as PEFT's `add_weighted_adapter` (non-SVD path).

    method: one of `ADAPTER_METHODS` (PEFT's combination types). Per target module, the A factors of the
    adapters having it are merged with weights sign(w s) sqrt(|w s|), the B factors with sqrt(|w s|)
    (`cat`: A_i w_i s_i and B_i concatenated). Returns an adapter with scaling 1.0 (lora_alpha = r), to be
    applied with `jaxcollab.lora.fold(params, adapter)` or saved with `LoraConfig(rank=r, alpha=r)`.
    weights default to 1.0 each; density to `DEFAULT_DENSITY`; seed is an int or key for DARE.
    """
    _check_method(method, ADAPTER_METHODS, "adapter merge")
    _check_sign_method(majority_sign_method)
    if isinstance(adapters, LoraAdapter) or not isinstance(adapters, Sequence):
        raise MergeError("adapters must be a list of LoraAdapter")
    if len(adapters) < 1:
        raise MergeError("merge_adapters needs at least one adapter")
    for i, adapter in enumerate(adapters):
        if not isinstance(adapter, LoraAdapter):
            raise MergeError(f"adapters[{i}] is a {type(adapter).__name__}, not a jaxcollab.lora.LoraAdapter")
        if not adapter.targets:
            raise MergeError(f"adapters[{i}] has no LoRA factors")
    weights = check_weights(weights, len(adapters), "adapters")
    if density is not None:
        _check_density(density)
    if len(adapters) == 1:  # PEFT combines a single adapter linearly whatever the requested type
        method = "linear"
    ranks = [a.rank for a in adapters]
    if method != "cat" and len(set(ranks)) != 1:
        raise MergeError(
            f"'{method}' merges factors entry by entry and needs adapters of one rank, got ranks {ranks};"
            " use 'cat' (or merge the full models with merging.merge)"
        )
    a_weights, b_weights = _factor_weights(weights, [a.scaling for a in adapters])
    key = as_key(seed)
    targets = sorted({t for a in adapters for t in a.targets}, key=ALL_TARGETS.index)
    out: dict = {}
    for target in targets:
        users = [i for i, a in enumerate(adapters) if target in a.targets]
        factors = [adapters[i].factors(target) for i in users]
        _check_factor_shapes(target, users, factors, same_rank=method != "cat")
        if method == "cat":
            parts = [(a, b, weights[i] * adapters[i].scaling) for i, (a, b) in zip(users, factors, strict=True)]
            set_path(out, TARGET_PATHS[target], _concatenated(parts, sum(ranks)))
            continue
        recipe = adapter_recipe(method, density, majority_sign_method)
        node = {}
        for factor_index, (factor_name, factor_weights) in enumerate((("lora_A", a_weights),
                                                                       ("lora_B", b_weights))):
            path_name = "/".join((*TARGET_PATHS[target], factor_name))
            leaves = [f[factor_index] for f in factors]
            merged = merge_leaves(recipe, None, leaves, [factor_weights[i] for i in users],
                                  leaf_key(key, path_name), stacked=True)
            node[factor_name] = _place_like(merged, leaves[0])
        set_path(out, TARGET_PATHS[target], node)
    return LoraAdapter(out, 1.0, adapters[0].dropout)


def _check_factor_shapes(target: str, users: list[int], factors: list[tuple[jax.Array, jax.Array]],
                         same_rank: bool) -> None:
    """All adapters' factors of one target fit one model (and, unless concatenated, have one rank)."""
    for factor_index, factor_name in enumerate(("lora_A", "lora_B")):
        first = tuple(factors[0][factor_index].shape)
        for user, pair in zip(users[1:], factors[1:], strict=True):
            shape = tuple(pair[factor_index].shape)
            rank_axis = 1 if factor_index == 0 else 2
            comparable = [d for axis, d in enumerate(shape) if same_rank or axis != rank_axis]
            expected = [d for axis, d in enumerate(first) if same_rank or axis != rank_axis]
            if comparable != expected:
                raise MergeError(
                    f"{target}.{factor_name} has shape {shape} in adapters[{user}] but {first} in"
                    f" adapters[{users[0]}]; adapters must be for the same model"
                )

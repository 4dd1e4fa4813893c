"""Model merging: hand-computed cases, properties, parity with mergekit (full models) and PEFT (LoRA factors)."""

import dataclasses
import warnings
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import build_hf_llama, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcollab import lora, merging, model

F32 = np.float32


def arr(*values):
    return jnp.asarray(np.array(values, F32))


def close(actual, expected, tol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------
# Hand-computed cases. base = 1 everywhere; the task vectors (model - base) are written out.
BASE = {"w": arr(1, 1, 1, 1, 1, 1)}
D1 = np.array([3, -1, 2, 0.5, -4, 0], F32)
D2 = np.array([-2, -2.5, 1, 0.5, 1.5, 0], F32)
D3 = np.array([-1, 4, -0.5, -3, 1, 0], F32)
M1, M2, M3 = ({"w": BASE["w"] + d} for d in (D1, D2, D3))
# M1 = [4, 0, 3, 1.5, -3, 1], M2 = [-1, -1.5, 2, 1.5, 2.5, 1]


def test_average_by_hand():
    # (M1 + M2) / 2 = [(4-1)/2, (0-1.5)/2, (3+2)/2, (1.5+1.5)/2, (-3+2.5)/2, (1+1)/2]
    close(merging.merge("average", BASE, [M1, M2])["w"], [1.5, -0.75, 2.5, 1.5, -0.25, 1])
    # weights [3, 1]: (3 M1 + M2) / 4 = [11/4, -1.5/4, 11/4, 6/4, -6.5/4, 1]
    close(merging.merge("average", None, [M1, M2], weights=[3, 1])["w"], [2.75, -0.375, 2.75, 1.5, -1.625, 1])


def test_task_arithmetic_by_hand():
    # sum w_i d_i with w = [1, 0.5]: [3-1, -1-1.25, 2+0.5, 0.5+0.25, -4+0.75, 0] = [2, -2.25, 2.5, 0.75, -3.25, 0]
    # scale 2 -> [4, -4.5, 5, 1.5, -6.5, 0]; plus base 1
    out = merging.merge("task_arithmetic", BASE, [M1, M2], weights=[1, 0.5], scale=2.0)
    close(out["w"], [5, -3.5, 6, 2.5, -5.5, 1])
    # default weights 1.0 each (mergekit): base + d1 + d2 = 1 + [1, -3.5, 3, 1, -2.5, 0]
    close(merging.merge("task_arithmetic", BASE, [M1, M2])["w"], [2, -2.5, 4, 2, -1.5, 1])


def test_ties_by_hand():
    # density 0.5 of 6 entries: k = 3 per model.
    #   |d1| = [3, 1, 2, .5, 4, 0] -> keep idx 4, 0, 2: t1 = [3, 0, 2, 0, -4, 0]
    #   |d2| = [2, 2.5, 1, .5, 1.5, 0] -> keep idx 1, 0, 4: t2 = [-2, -2.5, 0, 0, 1.5, 0]
    # weighted (w = [1, 0.5]): v1 = [3, 0, 2, 0, -4, 0], v2 = [-1, -1.25, 0, 0, 0.75, 0]
    # elected sign of v1 + v2 = [2, -1.25, 2, 0, -3.25, 0] -> [+, -, +, + (0 counts as +), -, +]
    # agreeing entries, divided by their weights:
    #   idx0: v1 = 3 -> 3/1; idx1: v2 = -1.25 -> -1.25/0.5 = -2.5; idx2: 2/1; idx3: none -> 0;
    #   idx4: v1 = -4 -> -4/1; idx5: none -> 0
    out = merging.merge("ties", BASE, [M1, M2], weights=[1, 0.5], density=0.5)
    close(out["w"], 1 + np.array([3, -2.5, 2, 0, -4, 0]))
    # normalize=False: the disjoint sum instead: [3, -1.25, 2, 0, -4, 0]
    out = merging.merge("ties", BASE, [M1, M2], weights=[1, 0.5], density=0.5, normalize=False)
    close(out["w"], 1 + np.array([3, -1.25, 2, 0, -4, 0]))


def test_ties_sign_election_total_and_frequency_by_hand():
    # density 1 (no trimming), weights 1, three models:
    #   d1 = [3, -1, 2, .5, -4, 0], d2 = [-2, -2.5, 1, .5, 1.5, 0], d3 = [-1, 4, -.5, -3, 1, 0]
    # total: sums [0, .5, 2.5, -2, -1.5, 0] -> [+, +, +, -, -, +]
    #   idx0: {3} -> 3; idx1: {4} -> 4; idx2: {2, 1} -> 1.5; idx3: {-3} -> -3; idx4: {-4} -> -4; idx5: 0
    out = merging.merge("ties", BASE, [M1, M2, M3], density=1.0)
    close(out["w"], 1 + np.array([3, 4, 1.5, -3, -4, 0]))
    # frequency: sign counts [-1, -1, +1, +1, +1, 0] -> [-, -, +, +, +, +]
    #   idx0: {-2, -1} -> -1.5; idx1: {-1, -2.5} -> -1.75; idx2: {2, 1} -> 1.5; idx3: {.5, .5} -> .5;
    #   idx4: {1.5, 1} -> 1.25; idx5: 0
    out = merging.merge("ties", BASE, [M1, M2, M3], density=1.0, majority_sign_method="frequency")
    close(out["w"], 1 + np.array([-1.5, -1.75, 1.5, 0.5, 1.25, 0]))


def test_magnitude_prune_by_hand():
    # the trimmed, weighted vectors of test_ties_by_hand summed without sign election:
    # v1 + v2 = [2, -1.25, 2, 0, -3.25, 0]
    out = merging.merge("magnitude_prune", BASE, [M1, M2], weights=[1, 0.5], density=0.5)
    close(out["w"], 1 + np.array([2, -1.25, 2, 0, -3.25, 0]))
    # mergekit keeps at least one entry: density 0.1 of 6 -> int(0.6) = 0 -> 1 entry (|-4| of d1)
    out = merging.merge("magnitude_prune", BASE, [M1], density=0.1)
    close(out["w"], 1 + np.array([0, 0, 0, 0, -4, 0]))


def test_dare_at_density_one_by_hand():
    # nothing dropped; w = [1, .5]: v1 = [3, -1, 2, .5, -4, 0], v2 = [-1, -1.25, .5, .25, .75, 0]
    # dare_linear: v1 + v2 = [2, -2.25, 2.5, .75, -3.25, 0]
    close(merging.merge("dare_linear", BASE, [M1, M2], weights=[1, 0.5], density=1.0)["w"],
          1 + np.array([2, -2.25, 2.5, 0.75, -3.25, 0]))
    # dare_ties (mergekit: no normalisation): elected [+, -, +, +, -, +]; agreeing sums:
    #   idx0: 3; idx1: -1 - 1.25 = -2.25; idx2: 2 + .5; idx3: .5 + .25; idx4: -4; idx5: 0
    close(merging.merge("dare_ties", BASE, [M1, M2], weights=[1, 0.5], density=1.0)["w"],
          1 + np.array([3, -2.25, 2.5, 0.75, -4, 0]))


def test_breadcrumbs_by_hand():
    """Of 20 entries sorted by |value|, density 0.5 and gamma 0.1 keep ranks 8..17: the 2 largest and the
    8 smallest are dropped; with density 0.95 only int(0.95 * 20) = 19 are kept, so 1 is dropped at the top
    and none at the bottom."""
    tau = np.array([(-1) ** i * (i + 1) for i in range(20)], np.float32)[np.random.default_rng(0).permutation(20)]
    base = {"w": jnp.zeros(20)}
    ranks = np.argsort(np.argsort(np.abs(tau)))  # 0 = the smallest |value|
    got = np.asarray(merging.merge("breadcrumbs", base, [{"w": jnp.asarray(tau)}], density=0.5)["w"])
    np.testing.assert_array_equal(got, np.where(ranks >= 10, tau, 0))  # default gamma: int(0.01 * 20) = 0
    recipe = dataclasses.replace(merging.full_model_recipe("breadcrumbs", 0.5), gamma=0.1)
    out = np.asarray(merging.merge_leaves(recipe, jnp.zeros(20), [jnp.asarray(tau)], [1.0], jax.random.key(0)))
    np.testing.assert_array_equal(out, np.where((ranks >= 8) & (ranks < 18), tau, 0))
    recipe = dataclasses.replace(merging.full_model_recipe("breadcrumbs", 0.95), gamma=0.1)
    out = np.asarray(merging.merge_leaves(recipe, jnp.zeros(20), [jnp.asarray(tau)], [1.0], jax.random.key(0)))
    np.testing.assert_array_equal(out, np.where(ranks < 19, tau, 0))


def test_dare_keeps_or_rescales_each_entry():
    # one model, density 0.25: every entry of the merged task vector is 0 (dropped) or d / 0.25 (kept)
    d = np.linspace(-2, 2, 400).astype(F32) + 0.01
    out = merging.merge("dare_linear", {"w": jnp.zeros(400)}, [{"w": jnp.asarray(d)}], density=0.25, seed=3)
    delta = np.asarray(out["w"])
    kept = delta != 0
    close(delta[kept], d[kept] * 4)
    assert 0.15 < kept.mean() < 0.35


@pytest.mark.parametrize("size", [7, 1000, 200_003])
@pytest.mark.parametrize("density", [0.2, 0.9])
def test_top_magnitude_mask_equals_lax_top_k_with_ties(size, density):
    """The bisection's mask is jax.lax.top_k's, ties at the threshold included (lowest index first); the
    largest size takes the sampled-bracket path."""
    rng = np.random.default_rng(size)
    # a coarse grid of magnitudes: many entries share the threshold's magnitude
    rows = jnp.asarray((rng.integers(-50, 51, (3, size)) * 0.01).astype(F32))
    k = max(1, int(density * size))
    _, top = jax.lax.top_k(jnp.abs(rows), k)
    expected = np.zeros((3, size), bool)
    np.put_along_axis(expected, np.asarray(top), True, axis=1)
    got = np.asarray(jax.jit(merging.top_magnitude_mask, static_argnums=1)(rows, k))
    assert (got.sum(axis=1) == k).all()
    np.testing.assert_array_equal(got, expected)


def test_sparsification_is_per_layer_for_stacked_leaves():
    # a [2 layers, 3] leaf, density 0.34: per layer k = max(1, int(1.02)) = 1 -> keep -5 and 0.3
    d = np.array([[1, -5, 2], [0.1, 0.3, -0.2]], F32)
    base = {"layers": {"w": jnp.zeros((2, 3))}, "other": {"w": jnp.zeros((2, 3))}}
    one = {"layers": {"w": jnp.asarray(d)}, "other": {"w": jnp.asarray(d)}}
    out = merging.merge("magnitude_prune", base, [one], density=0.34)
    close(out["layers"]["w"], [[0, -5, 0], [0, 0.3, 0]])
    # outside "layers" the leaf is one tensor: k = int(0.34 * 6) = 2 -> keep -5 and 2
    close(out["other"]["w"], [[0, -5, 2], [0, 0, 0]])


# LoRA factors, PEFT's way. One target, one layer, r = 1: A [1, 1, 2], B [1, 2, 1].
def adapter(a, b, scaling):
    weights = {"layers": {"self_attn": {"q_proj": {"lora_A": jnp.asarray(np.array(a, F32))[None],
                                                    "lora_B": jnp.asarray(np.array(b, F32))[None]}}}}
    return lora.LoraAdapter(weights, scaling)


AD1 = adapter([[1, -2]], [[3], [0.5]], scaling=2.0)
AD2 = adapter([[-1, 4]], [[1], [-2]], scaling=0.5)


def factors(ad):
    a, b = ad.factors("q_proj")
    return np.asarray(a[0]), np.asarray(b[0])


def test_adapter_linear_by_hand():
    # weights [2, 0.5]: w*s = [4, 0.25] -> each factor weighted by sqrt: [2, 0.5]
    # A = 2 [1, -2] + .5 [-1, 4] = [1.5, -2];  B = 2 [3, .5] + .5 [1, -2] = [6.5, 0]
    out = merging.merge_adapters("linear", [AD1, AD2], weights=[2, 0.5])
    a, b = factors(out)
    close(a, [[1.5, -2]])
    close(b, [[6.5], [0]])
    assert out.scaling == 1.0
    # a negative weight: w*s = -0.25 -> A weight -0.5 (the sign goes to A only), B weight +0.5
    # A = 2 [1, -2] - .5 [-1, 4] = [2.5, -6];  B = [6.5, 0]
    a, b = factors(merging.merge_adapters("linear", [AD1, AD2], weights=[2, -0.5]))
    close(a, [[2.5, -6]])
    close(b, [[6.5], [0]])


def test_adapter_ties_by_hand():
    # density 1, weights [2, 0.5] -> factor weights [2, 0.5]; PEFT elects on the unweighted factors and
    # divides by the number of agreeing entries.
    # A: [1, -2] and [-1, 4]: sums [0, 2] -> [+, +]; idx0: {2*1} / 1 = 2; idx1: {.5*4} / 1 = 2
    #    (electing on the weighted [2, -4] + [-.5, 2] = [1.5, -2] would have given idx1 = -4)
    # B: [3, .5] and [1, -2]: sums [4, -1.5] -> [+, -]; row0: (2*3 + .5*1) / 2 = 3.25; row1: .5*-2 / 1 = -1
    a, b = factors(merging.merge_adapters("ties", [AD1, AD2], weights=[2, 0.5], density=1.0))
    close(a, [[2, 2]])
    close(b, [[3.25], [-1]])


def test_adapter_magnitude_prune_and_cat_by_hand():
    # density 0.5 of 2 entries: k = 1. A1 -> [0, -2], A2 -> [0, 4]: A = 2 [0, -2] + .5 [0, 4] = [0, -2]
    # B1 -> [3, 0], B2 -> [0, -2]: B = 2 [3, 0] + .5 [0, -2] = [6, -1]
    a, b = factors(merging.merge_adapters("magnitude_prune", [AD1, AD2], weights=[2, 0.5], density=0.5))
    close(a, [[0, -2]])
    close(b, [[6], [-1]])
    # PEFT keeps k = int(0.4 * 2) = 0 entries: everything pruned
    a, b = factors(merging.merge_adapters("magnitude_prune", [AD1, AD2], density=0.4))
    assert not a.any() and not b.any()
    # cat: A_i * w_i * s_i stacked along the rank, B_i side by side: A = [[4, -8], [-.25, 1]], B = [[3, 1], [.5, -2]]
    a, b = factors(merging.merge_adapters("cat", [AD1, AD2], weights=[2, 0.5]))
    close(a, [[4, -8], [-0.25, 1]])
    close(b, [[3, 1], [0.5, -2]])


def test_single_adapter_is_combined_linearly_as_peft():
    # PEFT switches to "linear" for one adapter: no trimming even at density 0.2; w*s = 2*2 -> sqrt 2
    a, b = factors(merging.merge_adapters("ties", [AD1], weights=[2.0], density=0.2))
    close(a, [[2, -4]])
    close(b, [[6], [1]])


# ---------------------------------------------------------------------------------------------------------
# Properties.
def tree_of(values, shape):
    x = np.array(values, F32).reshape(shape)
    return {"layers": {"k": jnp.asarray(x)}, "norm": {"scale": jnp.asarray(x[0])}}


finite = st.floats(-4, 4, allow_nan=False, width=32)


@st.composite
def model_trees(draw, n_models):
    shape = draw(st.sampled_from([(2, 6), (3, 4)]))
    size = int(np.prod(shape))
    trees = [tree_of(draw(st.lists(finite, min_size=size, max_size=size)), shape) for _ in range(n_models + 1)]
    return trees[0], trees[1:]


def max_abs(*trees):
    return max(float(np.abs(np.asarray(x)).max()) for t in trees for x in jax.tree.leaves(t))


@settings(max_examples=25, deadline=None)
@given(model_trees(1), st.sampled_from(["ties", "dare_ties", "dare_linear", "magnitude_prune", "task_arithmetic"]),
       st.integers(0, 2**31 - 1))
def test_one_model_at_density_one_is_that_model(trees, method, seed):
    base, (one,) = trees
    out = merging.merge(method, base, [one], density=1.0, seed=seed)
    tol = 2e-7 * max_abs(base, one)  # (x - base) + base rounds once or twice in float32
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(one), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=tol)


@settings(max_examples=25, deadline=None)
@given(model_trees(1), st.integers(1, 5), st.lists(st.floats(0.1, 3), min_size=5, max_size=5))
def test_average_of_identical_models_is_the_model(trees, n, weights):
    _, (one,) = trees
    out = merging.merge("average", None, [one] * n, weights=weights[:n])
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(one), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6 * max_abs(one))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.integers(0, 10**6), st.sampled_from([0.3, 0.5, 1.0]),
       st.sampled_from(["total", "frequency"]))
def test_ties_keeps_only_entries_agreeing_with_the_elected_sign(n, data_seed, density, sign_method):
    rng = np.random.default_rng(data_seed)
    size = 12
    # distinct magnitudes, so that the top-k of each task vector is unambiguous
    deltas = np.stack([rng.permutation(np.arange(1, size + 1)) * rng.choice([-1.0, 1.0], size) for _ in range(n)])
    deltas[:, rng.integers(size)] = 0.0
    weights = rng.uniform(0.2, 2.0, n)
    base = {"w": jnp.zeros(size)}
    out = np.asarray(merging.merge("ties", base, [{"w": jnp.asarray(d, jnp.float32)} for d in deltas],
                                   weights=list(weights), density=density, majority_sign_method=sign_method)["w"])
    k = max(1, int(density * size))
    trimmed = np.zeros_like(deltas)
    for i, d in enumerate(deltas):
        top = np.argsort(-np.abs(d), kind="stable")[:k]
        trimmed[i, top] = d[top]
    score = (weights[:, None] * trimmed).sum(0) if sign_method == "total" else np.sign(trimmed).sum(0)
    elected = np.where(score >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == elected
    for j in range(size):
        if not agree[:, j].any():
            assert out[j] == 0.0
            continue
        values = trimmed[agree[:, j], j]
        assert np.sign(out[j]) == elected[j]
        # a weighted mean of the agreeing entries only
        assert values.min() - 1e-5 <= out[j] <= values.max() + 1e-5
        np.testing.assert_allclose(out[j], np.average(values, weights=weights[agree[:, j]]), rtol=1e-5)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_dare_is_unbiased_and_drops_the_asked_fraction(density):
    d = np.random.default_rng(0).normal(size=64).astype(F32)
    base = {"w": jnp.zeros(64)}
    keys = jax.random.split(jax.random.key(1), 4000)
    draws = jax.vmap(lambda k: merging.merge("dare_linear", base, [{"w": jnp.asarray(d)}], density=density,
                                             seed=k)["w"])(keys)
    draws = np.asarray(draws, np.float64)
    # each draw is d / density with probability density, else 0: the mean's std is |d| sqrt((1-p)/p/N)
    sigma = np.abs(d) * np.sqrt((1 - density) / density / len(keys))
    assert np.all(np.abs(draws.mean(0) - d) <= 5 * sigma + 1e-6)
    kept = draws != 0
    n = kept.size
    assert abs(kept.mean() - density) <= 5 * np.sqrt(density * (1 - density) / n)
    # one large tensor: the kept fraction of a single draw
    big = merging.merge("dare_ties", {"w": jnp.zeros(20000)}, [{"w": jnp.ones(20000)}], density=density, seed=7)
    frac = float(np.mean(np.asarray(big["w"]) != 0))
    assert abs(frac - density) <= 5 * np.sqrt(density * (1 - density) / 20000)


def test_dare_masks_depend_on_seed_and_leaf_path_only():
    base = {"a": jnp.zeros(300), "b": {"c": jnp.zeros(300)}}
    one = {"a": jnp.linspace(1, 2, 300), "b": {"c": jnp.linspace(1, 2, 300)}}
    out = merging.merge("dare_linear", base, [one], density=0.5, seed=11)
    # the same leaf merged alone, inside a different tree, gets the same mask
    alone = merging.merge("dare_linear", {"b": {"c": base["b"]["c"]}, "z": jnp.zeros(3)},
                          [{"b": {"c": one["b"]["c"]}, "z": jnp.ones(3)}], density=0.5, seed=11)
    np.testing.assert_array_equal(out["b"]["c"], alone["b"]["c"])
    # different leaves and different seeds get different masks; the same seed repeats
    assert not np.array_equal(np.asarray(out["a"]) != 0, np.asarray(out["b"]["c"]) != 0)
    other = merging.merge("dare_linear", base, [one], density=0.5, seed=12)
    assert not np.array_equal(out["a"], other["a"])
    np.testing.assert_array_equal(out["a"], merging.merge("dare_linear", base, [one], density=0.5, seed=11)["a"])
    # an explicit key: the documented derivation fold_in(fold_in(key, crc32(path)), model index)
    key = jax.random.key(11)
    leaf_key = jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(b"b/c") & 0x7FFFFFFF), 0)
    keep = np.asarray(jax.random.bernoulli(leaf_key, 0.5, (300,)))
    np.testing.assert_array_equal(np.asarray(out["b"]["c"]) != 0, keep)
    np.testing.assert_array_equal(out["a"], merging.merge("dare_linear", base, [one], density=0.5, seed=key)["a"])


# ---------------------------------------------------------------------------------------------------------
# dtype, sharding, jit
def test_bfloat16_in_and_out_with_float32_accumulation():
    rng = np.random.default_rng(0)
    base = rng.uniform(8, 12, 256).astype(jnp.bfloat16)  # one bf16 step (ulp) here is 1/16
    ulp = 1 / 16
    models = [{"w": jnp.asarray((base.astype(np.float64) + ulp * rng.choice([-2, -1, 1, 2], 256)
                                  ).astype(jnp.bfloat16))} for _ in range(10)]
    weights = [0.3] * 10  # each weighted task vector is below half a step: lost if added to the base in bf16
    out = merging.merge("task_arithmetic", {"w": jnp.asarray(base)}, models, weights=weights)["w"]
    assert out.dtype == jnp.bfloat16
    exact = base.astype(np.float64) + sum(0.3 * (np.asarray(m["w"], np.float64) - base.astype(np.float64))
                                          for m in models)
    got = np.asarray(out, np.float64)
    assert np.all(np.abs(got - exact) <= ulp)
    assert np.mean(got == exact.astype(jnp.bfloat16).astype(np.float64)) > 0.97
    sequential = base.copy()  # what accumulating in bfloat16 would give
    for m in models:
        sequential = (sequential + (0.3 * (np.asarray(m["w"], np.float64) - base.astype(np.float64))
                                    ).astype(jnp.bfloat16)).astype(jnp.bfloat16)
    assert np.mean(np.asarray(sequential, np.float64) == exact.astype(jnp.bfloat16).astype(np.float64)) < 0.7


def test_results_keep_the_input_sharding_and_merge_is_jittable():
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    spec = NamedSharding(mesh, PartitionSpec("x", None))
    rng = np.random.default_rng(0)
    base = {"layers": {"k": jax.device_put(rng.normal(size=(8, 16)).astype(F32), spec)}}
    models = [{"layers": {"k": jnp.asarray(rng.normal(size=(8, 16)).astype(F32))}} for _ in range(2)]
    out = merging.merge("ties", base, models, density=0.5)
    assert out["layers"]["k"].sharding == spec
    jitted = jax.jit(lambda b, ms: merging.merge("ties", b, ms, density=0.5))(base, models)
    np.testing.assert_array_equal(jitted["layers"]["k"], out["layers"]["k"])
    ad = lora.LoraAdapter({"layers": {"mlp": {"up_proj": {
        "lora_A": jax.device_put(jnp.ones((8, 2, 4)), spec), "lora_B": jax.device_put(jnp.ones((8, 4, 2)), spec)}}}},
        2.0)
    merged = merging.merge_adapters("ties", [ad, ad], density=0.5)
    assert merged.factors("up_proj")[0].sharding == spec


# ---------------------------------------------------------------------------------------------------------
# Errors
def test_clear_errors():
    with pytest.raises(merging.MergeError, match="unknown merge method 'tie'.*average, task_arithmetic, ties"):
        merging.merge("tie", BASE, [M1])
    for density in (0, 0.0, 1.5, -0.2):
        with pytest.raises(merging.MergeError, match=r"density must be in \(0, 1\]"):
            merging.merge("ties", BASE, [M1], density=density)
    with pytest.raises(merging.MergeError, match="got 3 weights for 2 models"):
        merging.merge("ties", BASE, [M1, M2], weights=[1, 1, 1])
    with pytest.raises(merging.MergeError, match="at least one model"):
        merging.merge("ties", BASE, [])
    with pytest.raises(merging.MergeError, match="needs the base"):
        merging.merge("ties", None, [M1])
    base = {"layers": {"q": jnp.zeros((2, 4)), "up": jnp.zeros((2, 3))}}
    wrong = {"layers": {"q": jnp.zeros((2, 4)), "up": jnp.zeros((2, 5))}}
    with pytest.raises(merging.MergeError, match=r"'layers/up' has shape \(2, 5\) in models\[1\] but \(2, 3\) in base"):
        merging.merge("ties", base, [base, wrong])
    with pytest.raises(merging.MergeError, match=r"models\[0\] has no parameter 'layers/up'"):
        merging.merge("ties", base, [{"layers": {"q": jnp.zeros((2, 4))}}])
    with pytest.raises(merging.MergeError, match=r"models\[0\] has parameter 'layers/v'.*base lacks"):
        merging.merge("ties", base, [{"layers": {**base["layers"], "v": jnp.zeros(1)}}])
    with pytest.raises(merging.MergeError, match="majority_sign_method"):
        merging.merge("ties", BASE, [M1], majority_sign_method="sum")
    with pytest.raises(merging.MergeError, match="must not sum to zero"):
        merging.merge("average", None, [M1, M2], weights=[1, -1])
    with pytest.raises(merging.MergeError, match="unknown adapter merge method 'average'.*linear, cat, ties"):
        merging.merge_adapters("average", [AD1, AD2])
    rank2 = adapter([[1, 2], [3, 4]], [[1, 2], [3, 4]], 1.0)
    with pytest.raises(merging.MergeError, match=r"one rank, got ranks \[1, 2\]"):
        merging.merge_adapters("ties", [AD1, rank2])
    with pytest.raises(merging.MergeError, match="at least one adapter"):
        merging.merge_adapters("ties", [])


# ---------------------------------------------------------------------------------------------------------
# Parity with mergekit (full task vectors). mergekit is a test-only reference.
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_models")
    paths = []
    for seed in range(4):
        path = root / f"m{seed}"
        build_hf_llama(path, seed=seed)
        paths.append(path)
    return paths, [model.load_hf(p)[1] for p in paths]


def mergekit_merge(out: Path, method: str, base: Path, models, weights, density=None, **global_params):
    pytest.importorskip("mergekit", reason="mergekit is the reference for full-model merges")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    entries = []
    for path, weight in zip(models, weights, strict=True):
        params = {"weight": weight}
        if density is not None:
            params["density"] = density
        if "gamma" in global_params:  # a per-model parameter in mergekit
            params["gamma"] = global_params["gamma"]
        entries.append({"model": str(path), "parameters": params})
    config = {"merge_method": method, "models": entries, "dtype": "float32"}
    if base is not None:
        config["base_model"] = str(base)
    global_params = {k: v for k, v in global_params.items() if k != "gamma"}
    if global_params:
        config["parameters"] = global_params
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return model.load_hf(out)[1]


MERGEKIT_CASES = [
    # (ours, mergekit, weights, density, our kwargs, mergekit global parameters)
    ("ties", "ties", [1.0, 0.5], 0.3, {}, {}),
    ("ties", "ties", [0.7, 1.0, 0.4], 0.5, {}, {}),
    ("ties", "ties", [1.0, 0.5], 0.2, {"normalize": False, "scale": 0.8}, {"normalize": False, "lambda": 0.8}),
    ("task_arithmetic", "task_arithmetic", [0.7, -0.4], None, {"scale": 0.8}, {"lambda": 0.8}),
    ("task_arithmetic", "task_arithmetic", [1.0, 1.0, 1.0], None, {}, {}),
    ("average", "linear", [1.0, 1.0, 1.0], None, {}, {}),
    ("average", "linear", [2.0, 1.0], None, {}, {}),
    ("magnitude_prune", "breadcrumbs", [1.0, 0.6], 0.3, {}, {"gamma": 0.0}),
    ("breadcrumbs", "breadcrumbs", [1.0, 0.6], 0.3, {}, {}),  # mergekit's default gamma 0.01
    ("breadcrumbs", "breadcrumbs", [0.8, 0.5, 1.0], 0.95, {}, {}),  # fewer dropped at the top to keep 95%
    ("dare_ties", "dare_ties", [1.0, 0.5], 1.0, {}, {}),  # density 1: DARE's deterministic part
    ("dare_linear", "dare_linear", [1.0, 0.5, 0.8], 1.0, {}, {}),
]


@pytest.mark.parametrize(("ours", "theirs", "weights", "density", "kwargs", "global_params"), MERGEKIT_CASES)
def test_full_model_merge_equals_mergekit(tiny_models, tmp_path, ours, theirs, weights, density, kwargs,
                                          global_params):
    paths, params = tiny_models
    base_path, model_paths = paths[0], paths[1:1 + len(weights)]
    reference = mergekit_merge(tmp_path / "mk", theirs, base_path if theirs != "linear" else None, model_paths,
                               weights, density, **global_params)
    base, models = params[0], params[1:1 + len(weights)]
    merged = merging.merge(ours, base, models, weights=weights, density=density, **kwargs)
    for (path, got), want, b in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree.leaves(reference),
                                    jax.tree.leaves(base), strict=True):
        name = jax.tree_util.keystr(path)
        assert rel_err(got, want) <= 1e-6, name
        if ours != "average":  # the merged task vectors themselves, not only the weights
            assert rel_err(np.asarray(got) - b, np.asarray(want) - b) <= 1e-5, name
    # the reference really merged: it differs from every input
    for m in models:
        assert rel_err(jax.tree.leaves(merged)[3], jax.tree.leaves(m)[3]) > 1e-2


def test_della_keep_probabilities_by_hand():
    # |row| = [3, 1, 2]: ranks 3, 1, 2 -> rank_norm 1, 0, 0.5 -> density - eps + rank_norm * 2 eps
    got = merging.della_keep_probabilities(jnp.array([[3.0, -1.0, 2.0]]), density=0.5, epsilon=0.1)
    np.testing.assert_allclose(np.asarray(got), [[0.6, 0.4, 0.5]], rtol=1e-6)
    with pytest.raises(merging.MergeError, match="density - epsilon"):
        merging.merge("della", {"w": jnp.zeros(4)}, [{"w": jnp.ones(4)}], density=0.1)  # 0.1 - 0.15 < 0


def test_della_keeps_about_density_per_row_and_the_l1_norm():
    rng = np.random.default_rng(0)
    tau = rng.standard_normal((64, 2000)).astype(np.float32)  # stored as a kernel: HF rows are its columns
    out = merging.merge("della", {"k": {"kernel": jnp.zeros_like(tau)}}, [{"k": {"kernel": jnp.asarray(tau)}}],
                        density=0.3, seed=5)["k"]["kernel"]
    kept = np.asarray(out) != 0
    assert abs(kept.mean() - 0.3) < 0.01
    # larger magnitudes are kept more often: within each HF row (a column of 64 here), 0.15 .. 0.45 by rank;
    # the lowest quarter of ranks 0.186 on average, the highest 0.414
    by_rank = np.take_along_axis(kept, np.argsort(np.abs(tau), axis=0), axis=0)
    assert abs(by_rank[:16].mean() - 0.186) < 0.01 and abs(by_rank[-16:].mean() - 0.414) < 0.01
    np.testing.assert_allclose(np.abs(np.asarray(out)).sum(), np.abs(tau).sum(), rtol=1e-5)  # L1 kept


def test_della_equals_mergekit_given_the_same_draws(tiny_models, tmp_path, monkeypatch):
    """mergekit's della with its Bernoulli draws replaced by one deterministic rule, and ours with the same
    rule: equal tensor for tensor, through the pytree merge and the file-to-file engine. This checks the
    keep probabilities (ranked along each Hugging Face row, also for kernels stored transposed), the L1
    rescaling, the sign election and the normalisation; the draws themselves are JAX's."""
    from jaxcollab.merge_checkpoints import merge_checkpoints

    density, epsilon = 0.4, 0.15
    threshold = density + 0.3137 * epsilon

    def rule(probabilities):
        return probabilities > threshold

    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: rule(p).to(p.dtype))
    monkeypatch.setattr(merging, "_keep", lambda key, p: rule(p))
    jax.clear_caches()  # no merge traced with the real draws may be reused
    try:
        paths, params = tiny_models
        weights = [1.0, 0.6]
        reference = mergekit_merge(tmp_path / "mk", "della", paths[0], paths[1:3], weights, density)
        merged = merging.merge("della", params[0], params[1:3], weights=weights, density=density)
        merge_checkpoints("della", paths[0], paths[1:3], tmp_path / "engine", weights=weights, density=density,
                          progress=False)
        engine = model.load_hf(tmp_path / "engine")[1]
    finally:
        jax.clear_caches()
    for (path, got), from_files, want in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree.leaves(engine),
                                             jax.tree.leaves(reference), strict=True):
        assert rel_err(got, want) <= 1e-5, jax.tree_util.keystr(path)
        assert rel_err(from_files, want) <= 1e-5, jax.tree_util.keystr(path)
    assert rel_err(jax.tree.leaves(merged)[3], jax.tree.leaves(params[1])[3]) > 1e-2


# ---------------------------------------------------------------------------------------------------------
# Parity with PEFT's add_weighted_adapter (LoRA factors merged separately) followed by merge_and_unload.
ADAPTER_SPECS = [  # (targets, r, alpha): different targets and scalings, one rank
    (["q_proj", "v_proj", "down_proj"], 4, 8),
    (["q_proj", "v_proj", "up_proj"], 4, 16),
    (["q_proj", "k_proj", "v_proj"], 4, 4),
]


def make_peft_adapters(base_path: Path, out_root: Path) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for i, (targets, r, alpha) in enumerate(ADAPTER_SPECS):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(base_path).eval()
        peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.3)
        peft_model.save_pretrained(out_root / f"adapter{i}")
        dirs.append(out_root / f"adapter{i}")
    return dirs


def peft_merged_state_dict(base_path: Path, adapter_dirs, weights, combination_type, density=None,
                           majority_sign_method="total") -> dict:
    """The reference: PEFT merges the adapters' factors, then the merged adapter is folded into the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    peft_model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], 1):
        peft_model.load_adapter(d, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density >= 1 prunes nothing
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type,
                                        density=density, majority_sign_method=majority_sign_method)
    peft_model.set_adapter("merged")
    merged = peft_model.merge_and_unload()
    return {k: v.detach().numpy().copy() for k, v in merged.state_dict().items()}


def hf_state_dict(params: dict, num_layers: int) -> dict:
    """Our parameter tree under Hugging Face names and layouts ([out, in])."""
    out = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"]),
           "model.norm.weight": np.asarray(params["norm"]["scale"]),
           "lm_head.weight": np.asarray(params["lm_head"]["kernel"]).T}
    for layer in range(num_layers):
        for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                out[f"model.layers.{layer}.{group}.{name}.weight"] = np.asarray(
                    params["layers"][group][name]["kernel"][layer]).T
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.layers.{layer}.{norm}.weight"] = np.asarray(params["layers"][norm]["scale"][layer])
    return out


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_merge")
    base_path = root / "base"
    build_hf_llama(base_path, seed=0)
    return base_path, make_peft_adapters(base_path, root)


PEFT_CASES = [
    # (combination type, number of adapters, weights, density, sign method)
    ("ties", 3, [1.0, 0.6, 0.3], 0.5, "total"),
    ("ties", 3, [1.0, 0.6, 0.3], 0.3, "frequency"),
    ("ties", 2, [0.8, 1.2], 0.2, "total"),
    ("linear", 3, [1.0, -0.5, 0.3], None, "total"),
    ("cat", 3, [1.0, 0.5, 2.0], None, "total"),
    ("magnitude_prune", 3, [1.0, 0.6, 0.3], 0.4, "total"),
    ("dare_ties", 3, [1.0, 0.6, 0.3], 1.0, "total"),  # density 1: DARE's deterministic part
    ("dare_linear", 2, [1.0, 0.6], 1.0, "total"),
    ("ties", 1, [0.7], 0.2, "total"),  # one adapter: PEFT combines it linearly
]


@pytest.mark.parametrize(("method", "n", "weights", "density", "sign"), PEFT_CASES)
def test_adapter_merge_equals_peft(peft_setup, method, n, weights, density, sign):
    base_path, adapter_dirs = peft_setup
    reference = peft_merged_state_dict(base_path, adapter_dirs[:n], weights, method, density, sign)
    cfg, params = model.load_hf(base_path)
    adapters = [lora.load_peft(d, cfg)[0] for d in adapter_dirs[:n]]
    merged_adapter = merging.merge_adapters(method, adapters, weights=weights, density=density,
                                            majority_sign_method=sign)
    ours = hf_state_dict(lora.fold(params, merged_adapter), cfg.num_layers)
    base = hf_state_dict(params, cfg.num_layers)
    assert set(ours) == set(reference)
    changed = 0
    for name, want in reference.items():
        assert rel_err(ours[name], want) <= 1e-6, name
        if not np.array_equal(want, base[name]):
            changed += 1
            assert rel_err(ours[name] - base[name], want - base[name]) <= 1e-5, name
    targets = {t for spec in ADAPTER_SPECS[:n] for t in spec[0]}
    assert changed == len(targets) * cfg.num_layers  # every targeted projection of every layer was merged


def test_adapter_semantics_differ_from_task_vector_semantics(peft_setup):
    """The factor-wise merge is not the merge of the task vectors s*BA; merging.merge gives the latter."""
    base_path, adapter_dirs = peft_setup
    cfg, params = model.load_hf(base_path)
    adapters = [lora.load_peft(d, cfg)[0] for d in adapter_dirs[:2]]
    factor_wise = lora.fold(params, merging.merge_adapters("linear", adapters))
    task_vectors = merging.merge("task_arithmetic", params, [lora.fold(params, a) for a in adapters])
    exact = params["layers"]["self_attn"]["q_proj"]["kernel"] + sum(lora.delta(a, "q_proj") for a in adapters)
    assert rel_err(task_vectors["layers"]["self_attn"]["q_proj"]["kernel"], exact) <= 1e-6
    assert rel_err(factor_wise["layers"]["self_attn"]["q_proj"]["kernel"], exact) > 1e-2

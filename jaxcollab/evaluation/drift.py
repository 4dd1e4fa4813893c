"""How far a model's weights moved: ||W - W_ref|| / ||W_ref|| over all parameters (Frobenius norms).

The paper's regime (Llama 3 8B at lr 2e-5) moves the weights by a tiny fraction of their norm in a round;
recording this number for every trained model tells a reader whether a run is in that regime. Norms are
accumulated leaf by leaf in float32 on the devices (no leaf is copied to the host), so it is cheap next to
an evaluation and works on sharded parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


@jax.jit
def _squared_norms(leaf: jax.Array, reference: jax.Array) -> tuple[jax.Array, jax.Array]:
    diff = leaf.astype(jnp.float32) - reference.astype(jnp.float32)
    return jnp.sum(diff * diff), jnp.sum(jnp.square(reference.astype(jnp.float32)))


def relative_change(params: Any, reference: Any) -> float:
    """||params - reference|| / ||reference||, both norms over every leaf; the trees must match in structure
    and shapes (a mixture of experts cannot be compared with a dense model this way)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    reference_leaves, reference_def = jax.tree_util.tree_flatten(reference)
    if treedef != reference_def:
        raise ValueError(f"relative_change: the trees differ in structure ({treedef} vs {reference_def})")
    changed = total = 0.0
    for leaf, ref in zip(leaves, reference_leaves, strict=True):
        if leaf.shape != ref.shape:
            raise ValueError(f"relative_change: leaf shapes differ ({leaf.shape} vs {ref.shape})")
        diff, norm = _squared_norms(leaf, ref)
        changed += float(diff)
        total += float(norm)
    if total == 0.0:
        raise ValueError("relative_change: the reference is all zeros")
    return (changed / total) ** 0.5

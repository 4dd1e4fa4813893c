"""Paths into the nested parameter dicts: read, look up (None when absent) and write one leaf."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def get_path(tree: dict, path: Sequence[str]) -> Any:
    """tree[path[0]][path[1]]...; a KeyError names the missing key."""
    for key in path:
        tree = tree[key]
    return tree


def find_path(tree: Any, path: Sequence[str]) -> Any:
    """Like `get_path`, but None when any key on the way is absent."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Sequence[str], value: Any) -> None:
    """Set the leaf at `path`, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value

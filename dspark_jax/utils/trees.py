"""What a pytree's size is, without its values: for cache keys and error messages."""
from __future__ import annotations

import jax


def leaf_shapes(tree) -> list[list]:
    """[path, shape, dtype] of every leaf of a pytree (paths as `jax.tree_util.keystr`: the same text in every
    process, so the list may key a cache file); [] for None."""
    return [[jax.tree_util.keystr(path), list(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", type(leaf).__name__))]
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def describe_tree(tree) -> str:
    """The tree's type and `leaf_shapes`, e.g. "HeadRows [['.table', [40, 640], 'float32'], …]"; "None" for None."""
    return "None" if tree is None else f"{type(tree).__name__} {leaf_shapes(tree)}"

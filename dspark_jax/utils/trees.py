"""What a pytree's size is, without its values: for cache keys and error messages."""
from __future__ import annotations

import jax


def leaf_shapes(tree) -> list[list]:
    """[path, shape, dtype] of every leaf of a pytree (paths as `jax.tree_util.keystr`: the same text in every
    process, so the list may key a cache file); [] for None."""
    return [[jax.tree_util.keystr(path), list(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", type(leaf).__name__))]
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def describe_tree(tree) -> str:
    """The tree's structure (`jax.tree.structure`: a bare array and a `HeadRows` differ, an array and a tracer of
    one do not) and its `leaf_shapes`, for comparing two trees in one process and for error messages; "None" for
    None."""
    return "None" if tree is None else f"{jax.tree.structure(tree)} with leaves {leaf_shapes(tree)}"

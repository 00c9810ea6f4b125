"""Reduced draft vocabulary: the N most frequent target tokens (EAGLE-3 / FR-Spec style).

The draft LM head and Markov head work on N << V tokens. p_d is zero outside the draft vocabulary,
so rejection sampling stays exact. `draft_to_target` maps draft index -> target id; `target_to_draft`
maps target id -> draft index, or N for tokens outside (their Markov embedding is a shared extra row).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class VocabMap(nnx.Variable):
    """Non-trainable integer mapping stored with the drafter (saved in its checkpoints)."""


def frequent_token_ids(token_lists: Iterable[Sequence[int]], size: int, vocab_size: int,
                       always_include: Sequence[int] = ()) -> np.ndarray:
    """The `size` most frequent ids (ties broken by id), always including `always_include`, sorted."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab_size}], got {size}")
    counts = np.zeros(vocab_size, np.int64)
    for ids in token_lists:
        np.add.at(counts, np.asarray(ids, np.int64), 1)
    forced = sorted({int(i) for i in always_include if 0 <= i < vocab_size})
    counts[forced] = np.iinfo(np.int64).max
    order = np.lexsort((np.arange(vocab_size), -counts))
    return np.sort(order[:size]).astype(np.int32)


def build_maps(draft_ids: np.ndarray | None, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """(draft_to_target [N], target_to_draft [V]); identity maps for the full vocabulary."""
    if draft_ids is None:
        ident = jnp.arange(vocab_size, dtype=jnp.int32)
        return ident, ident
    draft_ids = np.asarray(draft_ids, np.int32)
    if len(np.unique(draft_ids)) != len(draft_ids) or draft_ids.min() < 0 or draft_ids.max() >= vocab_size:
        raise ValueError("draft vocabulary ids must be unique and inside the target vocabulary")
    t2d = np.full(vocab_size, len(draft_ids), np.int32)
    t2d[draft_ids] = np.arange(len(draft_ids), dtype=np.int32)
    return jnp.asarray(draft_ids), jnp.asarray(t2d)


def check_draft_vocab(config, draft_vocab_ids) -> None:
    """A reduced draft vocabulary of N tokens needs exactly N ids."""
    n = config.draft_vocab_size
    if n is not None and (draft_vocab_ids is None or len(draft_vocab_ids) != n):
        raise ValueError(f"a reduced draft vocabulary of {n} needs exactly that many draft_vocab_ids")

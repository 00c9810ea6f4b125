"""Flattened verification layout: the tokens of a batch of requests laid end to end and padded to a bucket.

Request b verifies `lengths[b]` tokens (its anchor + the scheduled draft prefix; 0 = idle slot). They occupy
flat rows offsets[b] .. offsets[b] + lengths[b] - 1 of a list of `bucket` rows; rows past the total are
padding (position −1: their K/V are not written and their queries see nothing). The dense grid view
[B, max_per_request] maps back to flat rows so per-request work (attention, acceptance) stays batched.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """slot [T]: request row of each flat token (0 for padding); position [T]: absolute position (−1 pad);
    index [T]: index inside its request; grid [B, Q]: flat row of request b's k-th token, T (one past the
    end) where request b has fewer than k+1 tokens."""
    slot: jax.Array
    position: jax.Array
    index: jax.Array
    grid: jax.Array

    @property
    def bucket(self) -> int:
        return self.slot.shape[0]

    @property
    def valid(self) -> jax.Array:
        return self.position >= 0


def make_layout(lengths: jax.Array, start: jax.Array, bucket: int, per_request: int) -> TokenLayout:
    """Layout for `lengths[b]` tokens of request b at positions start[b].. (lengths <= per_request,
    Σ lengths <= bucket; larger totals are the caller's bug and are truncated at the bucket)."""
    lengths = lengths.astype(jnp.int32)
    ends = jnp.cumsum(lengths)
    offsets = ends - lengths
    t = jnp.arange(bucket, dtype=jnp.int32)
    slot = jnp.searchsorted(ends, t, side="right").astype(jnp.int32)
    valid = t < ends[-1]
    slot = jnp.where(valid, jnp.minimum(slot, lengths.shape[0] - 1), 0)
    index = jnp.where(valid, t - offsets[slot], 0)
    position = jnp.where(valid, start[slot] + index, -1)
    k = jnp.arange(per_request, dtype=jnp.int32)[None]
    grid = jnp.where(k < lengths[:, None], offsets[:, None] + k, bucket)
    grid = jnp.where(grid < bucket, grid, bucket)
    return TokenLayout(slot=slot, position=position.astype(jnp.int32), index=index, grid=grid.astype(jnp.int32))


def dense_layout(batch: int, per_request: int, start: jax.Array) -> TokenLayout:
    """Every request verifies exactly `per_request` tokens: the fixed bucket of the jitted loop."""
    return make_layout(jnp.full((batch,), per_request, jnp.int32), start, batch * per_request, per_request)


def to_grid(flat: jax.Array, layout: TokenLayout, fill=0) -> jax.Array:
    """[T, ...] -> [B, Q, ...] with `fill` where a request has no token."""
    padded = jnp.concatenate([flat, jnp.full((1,) + flat.shape[1:], fill, flat.dtype)], axis=0)
    return padded[layout.grid]


def from_grid(grid_values: jax.Array, layout: TokenLayout) -> jax.Array:
    """[B, Q, ...] -> [T, ...]: each flat row's value (padding rows read slot 0, index 0)."""
    return grid_values[layout.slot, layout.index]

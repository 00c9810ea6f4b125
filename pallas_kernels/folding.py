"""Query folding shared by the kernels: the T query tokens of a request and the `group` query heads that share
one KV head become the rows of a single tile, and each row gets an inclusive range [lo, hi] of visible cache keys.

Row r of KV head h holds query token t = r // group, head h * group + r % group. A row with hi < lo sees no
cache key (padded queries, rows added to reach the tile size).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fold_queries(q: jax.Array, num_kv_heads: int, rows: int) -> jax.Array:
    """[B, T, H, D] -> [B, KVH, rows, D] with rows >= T * group; extra rows are zeros."""
    b, t, h, d = q.shape
    group = h // num_kv_heads
    qf = q.reshape(b, t, num_kv_heads, group, d).transpose(0, 2, 1, 3, 4).reshape(b, num_kv_heads, t * group, d)
    return jnp.pad(qf, ((0, 0), (0, 0), (0, rows - t * group), (0, 0)))


def unfold_output(o: jax.Array, t: int, h: int) -> jax.Array:
    """Inverse of `fold_queries`: [B, KVH, rows, D] -> [B, T, H, D] (extra rows dropped)."""
    b, kvh, _, d = o.shape
    group = h // kvh
    return o[:, :, :t * group].reshape(b, kvh, t, group, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def _rows(x: jax.Array, group: int, rows: int, fill: int) -> jax.Array:
    """Per-token [B, T] values -> per-row [B, rows] (each token repeated `group` times, then `fill`)."""
    x = jnp.repeat(x.astype(jnp.int32), group, axis=1)
    return jnp.pad(x, ((0, 0), (0, rows - x.shape[1])), constant_values=fill)


def causal_bounds(q_positions: jax.Array, group: int, rows: int, seq_len: int,
                  window: int | None) -> tuple[jax.Array, jax.Array]:
    """Key slot s holds position s: a query at position p >= 0 sees slots max(0, p - window + 1) .. min(p, S - 1)."""
    p = q_positions.astype(jnp.int32)
    hi = jnp.where(p >= 0, jnp.minimum(p, seq_len - 1), -1)
    lo = jnp.zeros_like(p) if window is None else jnp.maximum(p - window + 1, 0)
    return _rows(lo, group, rows, 0), _rows(hi, group, rows, -1)


def prefix_bounds(ctx_len: jax.Array, num_tokens: int, group: int, rows: int,
                  seq_len: int) -> tuple[jax.Array, jax.Array]:
    """Every query of request b sees slots 0 .. min(ctx_len[b], S) - 1."""
    last = jnp.minimum(ctx_len.astype(jnp.int32), seq_len) - 1
    hi = jnp.broadcast_to(last[:, None], (ctx_len.shape[0], num_tokens))
    return _rows(jnp.zeros_like(hi), group, rows, 0), _rows(hi, group, rows, -1)

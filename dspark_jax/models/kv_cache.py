"""Contiguous per-layer KV cache. Rollback is free: stale entries sit at positions past a request's
length, are masked by causality and overwritten by the next write."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.models.config import TransformerConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k[i], v[i]: [batch, max_len, num_kv_heads, head_dim] for layer i; slot s holds position s."""
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def prefix(self, rows: int) -> "KVCache":
        """The first `rows` positions of every request (a caller that knows no request reaches past them
        attends over `rows` instead of `max_len`; `with_prefix` puts the result back). rows must be static."""
        if not 0 < rows <= self.max_len:
            raise ValueError(f"prefix rows must be in 1..{self.max_len}, got {rows}")
        return KVCache(tuple(a[:, :rows] for a in self.k), tuple(a[:, :rows] for a in self.v))

    def with_prefix(self, prefix: "KVCache") -> "KVCache":
        """This cache with its first `prefix.max_len` positions replaced by `prefix`'s (in place when the cache
        is donated to the jitted caller)."""
        put = lambda full, part: jax.lax.dynamic_update_slice(full, part.astype(full.dtype), (0,) * full.ndim)  # noqa: E731
        return KVCache(tuple(map(put, self.k, prefix.k)), tuple(map(put, self.v, prefix.v)))


def init_cache(config: TransformerConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)))


def write_contiguous(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes new[b] ([T, ...]) into buffer[b] at rows start[b]..start[b]+T-1.

    Callers guarantee start + T <= max_len (dynamic_update_slice would otherwise clamp and shift).
    """
    def one(buf, x, s):
        return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), (s,) + (0,) * (buf.ndim - 1))
    return jax.vmap(one)(buffer, new, start)


def scatter_rows(buffer: jax.Array, new: jax.Array, slot: jax.Array, position: jax.Array) -> jax.Array:
    """buffer [B, S, ...] with row n of new ([N, ...]) written at [slot[n], position[n]]; rows with position < 0
    are dropped. slot, position: [N] int."""
    rows = jnp.where(position >= 0, position, buffer.shape[1])  # out of range: dropped
    return buffer.at[slot, rows].set(new.astype(buffer.dtype), mode="drop")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVRows:
    """K/V rows computed but not yet written into a cache: k[i], v[i] [B, Q, KVH, D] for layer i, row (b, j) at
    position[b, j] of request b (position < 0: no row)."""
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    position: jax.Array

    def padded(self, rows: int) -> "KVRows":
        """The same rows with Q padded to `rows` (padding: no row)."""
        extra = rows - self.position.shape[1]
        pad = lambda a: jnp.pad(a, [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
        return KVRows(tuple(map(pad, self.k)), tuple(map(pad, self.v)),
                      jnp.pad(self.position, [(0, 0), (0, extra)], constant_values=-1))

    def write(self, cache: KVCache) -> KVCache:
        """The cache with every row written (`scatter_rows`)."""
        b, q = self.position.shape
        slot = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, q)).reshape(-1)
        position = self.position.reshape(-1)

        def put(buffer, new):
            return scatter_rows(buffer, new.reshape((b * q,) + new.shape[2:]), slot, position)
        return KVCache(tuple(map(put, cache.k, self.k)), tuple(map(put, cache.v, self.v)))

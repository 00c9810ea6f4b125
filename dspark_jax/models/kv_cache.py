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

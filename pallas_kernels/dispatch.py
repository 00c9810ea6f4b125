"""One attention function for every model; the implementation is chosen here, not in model code."""
from __future__ import annotations

import enum

import jax

from pallas_kernels import reference


class AttentionImpl(str, enum.Enum):
    REFERENCE = "reference"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
              window: int | None = None, kv_positions: jax.Array | None = None,
              impl: AttentionImpl | str = AttentionImpl.REFERENCE) -> jax.Array:
    """Causal (optionally sliding-window) GQA attention of `q` against a KV cache. See `reference`."""
    impl = AttentionImpl(impl)
    if impl is AttentionImpl.REFERENCE:
        return reference.causal_attention(q, k, v, q_positions, scale=scale, window=window,
                                          kv_positions=kv_positions)
    raise ValueError(f"unknown attention implementation {impl!r}")


def block_attention(q: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array, ctx_len: jax.Array, blk_k: jax.Array,
                    blk_v: jax.Array, *, scale: float, impl: AttentionImpl | str = AttentionImpl.REFERENCE) -> jax.Array:
    """Drafter block attention (context prefix + bidirectional block). See `reference.block_attention`."""
    impl = AttentionImpl(impl)
    if impl is AttentionImpl.REFERENCE:
        return reference.block_attention(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v, scale=scale)
    raise ValueError(f"unknown attention implementation {impl!r}")

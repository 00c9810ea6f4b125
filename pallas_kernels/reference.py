"""Pure-JAX reference attention: several queries per request against that request's KV cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite: a fully masked row softmaxes to uniform weights, never NaN


def attention_mask(q_positions: jax.Array, kv_positions: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] bool: query at absolute position p sees key at position j iff j <= p (and j > p - window).

    Negative query positions mark padded rows; they see nothing.
    """
    q = q_positions[:, :, None]
    k = kv_positions[:, None, :]
    mask = (k <= q) & (q >= 0) & (k >= 0)
    if window is not None:
        mask &= k > q - window
    return mask


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                     *, scale: float, window: int | None = None,
                     kv_positions: jax.Array | None = None) -> jax.Array:
    """Grouped-query attention with per-request causal offsets.

    q: [B, T, H, D]; k, v: [B, S, KVH, D] with H a multiple of KVH; q_positions: [B, T] absolute
    positions of the queries; key slot s holds position `kv_positions[b, s]` (default: s).
    Softmax in float32; output [B, T, H, D] in q's dtype. Padded query rows (position < 0) give zeros.
    Non-finite values in v are read as 0: a masked key's weight is exactly 0, but 0 · NaN is NaN, so a stale
    or rejected row with NaN values would otherwise poison every query of its request; a broken row that a
    query does attend to still makes that query non-finite through its key (same hidden state), which is how
    the serving engine detects it.
    """
    b, t, h, d = q.shape
    v = jnp.where(jnp.isfinite(v), v, jnp.zeros((), v.dtype))
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
    qg = q.reshape(b, t, kvh, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_positions, kv_positions, window)[:, None, None]
    logits = jnp.where(mask, logits, _NEG)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = jnp.where(mask, weights, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def block_attention(q: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array, ctx_len: jax.Array,
                    blk_k: jax.Array, blk_v: jax.Array, *, scale: float) -> jax.Array:
    """Drafter block attention: the block's queries see context keys 0..ctx_len-1 and every block key
    (bidirectional inside the block).

    q, blk_k, blk_v: [B, G, H|KVH, D] (G = block size); ctx_k, ctx_v: [B, S, KVH, D]; ctx_len: [B].
    """
    b, g, h, d = q.shape
    s, kvh = ctx_k.shape[1], ctx_k.shape[2]
    k = jnp.concatenate([ctx_k, blk_k.astype(ctx_k.dtype)], axis=1)
    v = jnp.concatenate([ctx_v, blk_v.astype(ctx_v.dtype)], axis=1)
    qg = q.reshape(b, g, kvh, h // kvh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    valid = jnp.concatenate([jnp.arange(s)[None, :] < ctx_len[:, None], jnp.ones((b, g), bool)], axis=1)
    logits = jnp.where(valid[:, None, None, None, :], logits, _NEG)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, g, h, d).astype(q.dtype)

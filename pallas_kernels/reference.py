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


def prefix_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cache_len: jax.Array,
                     k_new: jax.Array, v_new: jax.Array, q_positions: jax.Array, new_positions: jax.Array,
                     *, scale: float, window: int | None = None) -> jax.Array:
    """Causal attention of new tokens against a read-only KV cache prefix and their own keys, without writing
    the new keys into the cache: query i of request b sees cache keys at slots s < cache_len[b] and new keys j
    with new_positions[b, j] <= q_positions[b, i] (both within `window`). Equal to `causal_attention` over the
    cache with the new keys written at their positions; the scores of the two parts are softmaxed together,
    so the cache is read in place (a jitted loop that writes it afterwards, outside a conditional, never
    copies it).

    q: [B, T, H, D]; k_cache, v_cache: [B, S, KVH, D]; cache_len: [B]; k_new, v_new: [B, T, KVH, D];
    q_positions, new_positions: [B, T] absolute positions (negative: padding — such a query sees nothing and
    such a key is seen by none). Output [B, T, H, D] in q's dtype; padded query rows give zeros."""
    b, t, h, d = q.shape
    s, kvh = k_cache.shape[1], k_cache.shape[2]
    v_cache = jnp.where(jnp.isfinite(v_cache), v_cache, jnp.zeros((), v_cache.dtype))
    v_new = jnp.where(jnp.isfinite(v_new), v_new, jnp.zeros((), v_new.dtype))
    qg = q.reshape(b, t, kvh, h // kvh, d)
    slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
    cache_pos = jnp.where(slots < cache_len[:, None], slots, -1)
    mask_c = attention_mask(q_positions, cache_pos, window)[:, None, None]
    mask_n = attention_mask(q_positions, new_positions, window)[:, None, None]
    logits_c = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache, preferred_element_type=jnp.float32) * scale
    logits_n = jnp.einsum("btkgd,bskd->bkgts", qg, k_new.astype(k_cache.dtype),
                          preferred_element_type=jnp.float32) * scale
    logits = jnp.concatenate([jnp.where(mask_c, logits_c, _NEG), jnp.where(mask_n, logits_n, _NEG)], axis=-1)
    weights = jnp.where(jnp.concatenate([mask_c, mask_n], axis=-1), jax.nn.softmax(logits, axis=-1), 0.0)
    out = (jnp.einsum("bkgts,bskd->btkgd", weights[..., :s].astype(v_cache.dtype), v_cache,
                      preferred_element_type=jnp.float32)
           + jnp.einsum("bkgts,bskd->btkgd", weights[..., s:].astype(v_cache.dtype), v_new.astype(v_cache.dtype),
                        preferred_element_type=jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)

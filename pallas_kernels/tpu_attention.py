"""Ranged multi-query attention as a Mosaic (TPU) Pallas kernel. UNTESTED on TPU hardware; its semantics are
tested on CPU under TPU interpret mode (`pltpu.InterpretParams`).

Same contract as `gpu_attention.ranged_attention` (folded query rows, inclusive visible slots [lo, hi]) without
the extra-keys input: `append_block` places the drafter block right after each request's context instead.
Grid (request, KV head, KV block) with the KV axis sequential; the per-request range of needed KV blocks is
scalar-prefetched, so out-of-range grid steps neither compute nor fetch (their index map repeats a block).
K/V are copied once to a head-major, block-padded layout [B, KVH, S_pad, D] so every block is (block_k, D) and
shape-legal for Mosaic; a TPU deployment would keep its cache in that layout and skip the copy.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_NEG = -1e30
_LANES = 128


def append_block(ctx: jax.Array, blk: jax.Array, ctx_len: jax.Array) -> jax.Array:
    """[B, S, KVH, D] context and [B, G, KVH, D] block -> [B, S + G, KVH, D] with the block at slots
    ctx_len[b] .. ctx_len[b] + G - 1, so the visible keys of request b are exactly slots 0 .. ctx_len[b] + G - 1."""
    s, g = ctx.shape[1], blk.shape[1]
    padded = jnp.pad(ctx, ((0, 0), (0, g), (0, 0), (0, 0)))
    start = jnp.minimum(ctx_len.astype(jnp.int32), s)
    put = jax.vmap(lambda row, x, t: jax.lax.dynamic_update_slice(row, x, (t, 0, 0)))
    return put(padded, blk.astype(ctx.dtype), start)


def _kernel(first_ref, end_ref, q_ref, lo_ref, hi_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *,
            scale: float, block_k: int, precision):
    b, j = pl.program_id(0), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= first_ref[b]) & (j < end_ref[b]))
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * scale
        cols = j * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = (cols >= lo_ref[...]) & (cols <= hi_ref[...])
        s = jnp.where(mask, s, _NEG)
        m_prev = jnp.max(m_sc[...], axis=1, keepdims=True)  # lanes hold copies of one value
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_new = alpha * jnp.max(l_sc[...], axis=1, keepdims=True) + jnp.sum(p, axis=1, keepdims=True)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(l_new, l_sc.shape)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        l = jnp.max(l_sc[...], axis=1, keepdims=True)
        o_ref[...] = (acc_sc[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "interpret"))
def ranged_attention(q: jax.Array, lo: jax.Array, hi: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                     block_k: int = 128, interpret: bool = False) -> jax.Array:
    """q: [B, KVH, R, D] folded queries (R a multiple of 16); lo, hi: [B, R]; k, v: [B, S, KVH, D].
    `interpret`: simulate a TPU on CPU. Returns [B, KVH, R, D] in q's dtype."""
    b, kvh, rows, d = q.shape
    s = k.shape[1]
    num_blocks = -(-s // block_k)
    pad = ((0, 0), (0, num_blocks * block_k - s), (0, 0), (0, 0))
    kt = jnp.pad(k, pad).transpose(0, 2, 1, 3)
    vt = jnp.pad(v, pad).transpose(0, 2, 1, 3)
    live = hi >= lo
    first = jnp.minimum(jnp.min(jnp.where(live, lo, s), axis=1) // block_k, num_blocks - 1).astype(jnp.int32)
    end = ((jnp.max(jnp.where(live, hi, -1), axis=1) + block_k) // block_k).astype(jnp.int32)

    def kv_map(i, h, j, first_ref, end_ref):
        return i, h, jnp.clip(j, first_ref[i], jnp.maximum(end_ref[i] - 1, first_ref[i])), 0

    q_spec = pl.BlockSpec((None, None, rows, d), lambda i, h, j, *_: (i, h, 0, 0))
    bound_spec = pl.BlockSpec((None, rows, 1), lambda i, h, j, *_: (i, 0, 0))
    kv_spec = pl.BlockSpec((None, None, block_k, d), kv_map)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, kvh, num_blocks),
        in_specs=[q_spec, bound_spec, bound_spec, kv_spec, kv_spec], out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((rows, _LANES), jnp.float32), pltpu.VMEM((rows, _LANES), jnp.float32),
                        pltpu.VMEM((rows, d), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_kernel, scale=scale, block_k=block_k, precision=precision),
        grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False, name="ranged_attention_tpu",
    )(first, end, q, lo[..., None], hi[..., None], kt, vt)

"""Ranged multi-query attention as a Triton-lowered Pallas kernel (GPU); runs in interpret mode on any backend.

One program = (request, KV head, row block, KV split). Its rows are folded queries (`folding`: query tokens x
the query heads of that KV head), row r sees cache slots lo[r]..hi[r], and all rows share one pass over the
K/V blocks between the smallest visible slot and the largest: blocks outside every row's range are never
read. Optional "extra" keys (the drafter block) are seen by every row. Online softmax in float32.

K/V stay in the cache layout [B, S, KVH, D] (no copy). S need not be a multiple of the block: the last block
is shifted back to end at S and its already-visited slots are masked, so no load goes out of bounds.
With k_splits > 1 each split writes an unnormalised partial (acc, m, l), combined afterwards (split-K, for
small B * KVH where programs alone would not fill the GPU).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.folding import next_pow2

_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) underflows to 0, _NEG - _NEG = 0 (never NaN)
_TARGET_PROGRAMS = 256  # ~2 waves on a 132-SM H100/H200


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Tiling. block_k / block_rows: powers of two >= 16. k_splits None: enough splits for ~256 programs."""
    block_k: int = 64
    block_rows: int = 64
    k_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2


def _online_step(carry, q, k, v, mask, scale: float, precision):
    """One flash-attention update of (acc [R, D], m [R], l [R]) with keys k [N, D] under mask [R, N]."""
    acc, m, l = carry
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
    return alpha[:, None] * acc + pv, m_new, alpha * l + jnp.sum(p, axis=1)


def _kernel(q_ref, lo_ref, hi_ref, k_ref, v_ref, *refs, scale: float, block_k: int, seq_len: int,
            blocks_per_split: int, num_extra: int, split_out: bool, precision):
    if num_extra:
        ek_ref, ev_ref, *out_refs = refs
    else:
        out_refs = refs
    split = pl.program_id(3)
    q, lo, hi = q_ref[...], lo_ref[...], hi_ref[...]
    live = hi >= lo
    first = jax.lax.div(jnp.min(jnp.where(live, lo, seq_len)), block_k)
    end = jax.lax.div(jnp.max(jnp.where(live, hi, -1)) + block_k, block_k)  # exclusive; 0 when no row is live
    first = jnp.maximum(first, split * blocks_per_split)
    end = jnp.minimum(end, (split + 1) * blocks_per_split)
    cols = jnp.arange(block_k)[None, :]

    def body(i, carry):
        start = jnp.minimum(i * block_k, seq_len - block_k)
        c = start + cols
        mask = (c >= i * block_k) & (c >= lo[:, None]) & (c <= hi[:, None])
        kb = k_ref[pl.ds(start, block_k), :]
        vb = v_ref[pl.ds(start, block_k), :]
        return _online_step(carry, q, kb, vb, mask, scale, precision)

    rows, d = q.shape
    carry = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    carry = jax.lax.fori_loop(first, end, body, carry)
    if num_extra:
        ek, ev = ek_ref[...], ev_ref[...]
        mask = (jnp.arange(ek.shape[0])[None, :] < num_extra) & (split == 0)
        carry = _online_step(carry, q, ek, ev, jnp.broadcast_to(mask, (rows, ek.shape[0])), scale, precision)
    acc, m, l = carry
    if split_out:
        acc_ref, m_ref, l_ref = out_refs
        acc_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l
    else:
        out_refs[0][...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(out_refs[0].dtype)


def _combine(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merges split partials acc [J, ..., D], m/l [J, ...] into normalised outputs [..., D]."""
    m_all = jnp.max(m, axis=0)
    c = jnp.exp(m - m_all)
    l_all = jnp.sum(c * l, axis=0)
    out = jnp.sum(c[..., None] * acc, axis=0)
    return out / jnp.where(l_all > 0, l_all, 1.0)[..., None]


# Tiles by (dtype, head_dim, folded rows), the fastest of `benchmarks/gpu_kernels.py --tile_sweep` on one H200
# (session 31, benchmarks/results/device_s31/; us per call at S 1024: Gemma 3 270M heads at B 1, Qwen3-8B's at
# B 8, GpuConfig()'s in brackets); shapes not listed use GpuConfig(). Other GPUs may prefer other tiles: rerun
# the sweep there (`bash benchmarks/device_check.sh` writes tiles.json). In float32 the default 64 x 64
# tiles are 6-22x slower at 32-64 rows than the best (float32 dots run on CUDA cores with their operands in registers:
# most likely register spills, not confirmed from the compiler's output).
# Correctness does not depend on the tiles (tests/pallas_kernels run every entry against the reference).
TUNED: dict[tuple[str, int, int], GpuConfig] = {
    ("float32", 256, 16): GpuConfig(block_rows=16, block_k=16, num_stages=1),  # 33 us (GpuConfig(): 56)
    ("float32", 256, 32): GpuConfig(block_rows=32, block_k=16, num_stages=1),  # 45 us (525)
    ("float32", 256, 64): GpuConfig(block_rows=16, block_k=32, num_stages=1),  # 45 us (996)
    ("float32", 128, 32): GpuConfig(block_rows=16),  # 143 us (858)
    ("float32", 128, 64): GpuConfig(block_rows=16),  # 247 us (2,492)
    ("bfloat16", 256, 16): GpuConfig(block_rows=16, block_k=32, num_warps=8, num_stages=1),  # 17 us (27)
    ("bfloat16", 256, 32): GpuConfig(block_rows=32, block_k=32),  # 18 us (31)
    ("bfloat16", 256, 64): GpuConfig(block_rows=64, block_k=32),  # 19 us (35)
    ("bfloat16", 128, 16): GpuConfig(block_rows=16, block_k=32, num_warps=8, num_stages=1),  # 27 us (29)
    ("bfloat16", 128, 64): GpuConfig(block_rows=16),  # 44 us (55)
}


def tuned_config(dtype, head_dim: int, rows: int) -> GpuConfig:
    """The tiles for queries of `dtype` with `head_dim`, folded to `rows` rows: TUNED's entry or GpuConfig()."""
    return TUNED.get((jnp.dtype(dtype).name, int(head_dim), int(rows)), GpuConfig())


def table_from_sweep(best: dict[str, dict]) -> dict[tuple[str, int, int], GpuConfig]:
    """A TUNED-style table from `benchmarks/gpu_kernels.py --tiles_output` JSON ({"dtype,D,rows": {block_rows,
    block_k, num_warps, num_stages, ...}})."""
    table = {}
    for key, cfg in best.items():
        dtype, d, rows = key.split(",")
        table[(dtype, int(d), int(rows))] = GpuConfig(block_rows=cfg["block_rows"], block_k=cfg["block_k"],
                                                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return table


def set_tuned(table: dict[tuple[str, int, int], GpuConfig]) -> None:
    """Replaces TUNED (a measured table for this process, e.g. from a tile sweep on this device)."""
    TUNED.clear()
    TUNED.update(table)


def default_splits(programs: int, num_blocks: int) -> int:
    """Enough KV splits for ~_TARGET_PROGRAMS programs, each split at least 2 blocks."""
    return max(1, min(-(-_TARGET_PROGRAMS // programs), num_blocks // 2))


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def ranged_attention(q: jax.Array, lo: jax.Array, hi: jax.Array, k: jax.Array, v: jax.Array,
                     extra_k: jax.Array | None = None, extra_v: jax.Array | None = None, *, scale: float,
                     config: GpuConfig = GpuConfig(), interpret: bool = False) -> jax.Array:
    """q: [B, KVH, R, D] folded queries (R a power of two >= 16); lo, hi: [B, R] inclusive visible slots;
    k, v: [B, S, KVH, D]; extra_k, extra_v: [B, G, KVH, D] keys every row sees. Returns [B, KVH, R, D]."""
    b, kvh, rows, d = q.shape
    s = k.shape[1]
    bk = max(16, min(config.block_k, next_pow2(s)))
    if s < bk:  # tiny caches only: pad so one full block fits
        pad = ((0, 0), (0, bk - s), (0, 0), (0, 0))
        k, v, s = jnp.pad(k, pad), jnp.pad(v, pad), bk
    num_blocks = -(-s // bk)
    br = min(config.block_rows, rows)
    row_blocks = rows // br
    splits = config.k_splits or default_splits(b * kvh * row_blocks, num_blocks)
    per_split = -(-num_blocks // min(splits, num_blocks))
    splits = -(-num_blocks // per_split)

    q_spec = pl.BlockSpec((None, None, br, d), lambda i, h, r, j: (i, h, r, 0))
    bound_spec = pl.BlockSpec((None, br), lambda i, h, r, j: (i, r))
    kv_spec = pl.BlockSpec((None, s, None, d), lambda i, h, r, j: (i, 0, h, 0))
    in_specs, args = [q_spec, bound_spec, bound_spec, kv_spec, kv_spec], [q, lo, hi, k, v]
    num_extra = 0
    if extra_k is not None:
        num_extra = extra_k.shape[1]
        gp = max(16, next_pow2(num_extra))
        pad = ((0, 0), (0, gp - num_extra), (0, 0), (0, 0))
        extra_spec = pl.BlockSpec((None, gp, None, d), lambda i, h, r, j: (i, 0, h, 0))
        in_specs += [extra_spec, extra_spec]
        args += [jnp.pad(extra_k.astype(k.dtype), pad), jnp.pad(extra_v.astype(v.dtype), pad)]

    split_out = splits > 1
    if split_out:
        out_shape = [jax.ShapeDtypeStruct((splits, b, kvh, rows, d), jnp.float32),
                     jax.ShapeDtypeStruct((splits, b, kvh, rows), jnp.float32),
                     jax.ShapeDtypeStruct((splits, b, kvh, rows), jnp.float32)]
        row_spec = pl.BlockSpec((None, None, None, br), lambda i, h, r, j: (j, i, h, r))
        out_specs = [pl.BlockSpec((None, None, None, br, d), lambda i, h, r, j: (j, i, h, r, 0)), row_spec, row_spec]
    else:
        out_shape, out_specs = jax.ShapeDtypeStruct(q.shape, q.dtype), q_spec

    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, scale=scale, block_k=bk, seq_len=s, blocks_per_split=per_split,
                               num_extra=num_extra, split_out=split_out, precision=precision)
    out = pl.pallas_call(
        kernel, grid=(b, kvh, row_blocks, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret, name="ranged_attention")(*args)
    if split_out:
        return _combine(*out).astype(q.dtype)
    return out

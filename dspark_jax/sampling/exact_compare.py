"""Exact comparisons from arithmetic only, a fast exact argmax, and the Gumbel-max draw built on it.

XLA:CPU runs a row reduction fast only when its fused input is plain arithmetic: a compare or select in it
makes XLA materialise a [B, V] intermediate first. The filter threshold's full-row passes (`sampling.threshold`)
therefore compare through `gt_step`, which is exact under the stated conditions; `fast_argmax` needs no compare
over the whole row.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.sampling.keys import row_keys

TINY = 2.0 ** -100


def gt_step(a: jax.Array, b: jax.Array) -> jax.Array:
    """[a > b] as float32 0/1 from arithmetic only (max, ceil, min of a − b), for non-NaN a, b (±inf allowed, not
    both the same infinity) where one operand r of every pair has r == 0 or |r| >= 2^-100.

    Exact: a − b rounds to a value of the right sign, and is nonzero when a != b, unless the difference of
    two distinct values is flushed to zero (XLA:CPU flushes denormals), which needs |a|, |b| < 2^-100 both: if
    |r| >= 2^-100 and the other operand is < 2^-101 in magnitude, |a − b| >= 2^-101; otherwise both are
    >= 2^-101 in magnitude and a nonzero difference is a multiple of 2^-124. If r == 0 the difference is ±the
    other operand. (Denormal inputs read as zero in every float operation and comparison alike.)"""
    return jnp.minimum(jnp.ceil(jnp.maximum(a - b, 0.0)), 1.0)


def gt_safe(r: jax.Array) -> jax.Array:
    """r may serve as the reference operand of `gt_step`."""
    return (r == 0) | (jnp.abs(r) >= TINY)


ARGMAX_BLOCK = 1024


def _blocks(x: jax.Array, block: int, fill: float = -jnp.inf) -> jax.Array:
    """x [B, V] float32 as [B, ceil(V / block), block], the last block padded with `fill`."""
    rows, v = x.shape
    return jnp.pad(x, ((0, 0), (0, -v % block)), constant_values=fill).reshape(rows, -1, block)


def _block_stats(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(blocks [B, N, ARGMAX_BLOCK] padded with −inf, their maxima [B, N], their sums [B, N] without the padding)
    for x [B, V] float32: two plain reductions over the row (XLA:CPU runs them apart)."""
    blocks = _blocks(x, ARGMAX_BLOCK)
    sums = jnp.sum(blocks if x.shape[-1] % ARGMAX_BLOCK == 0 else _blocks(x, ARGMAX_BLOCK, 0.0), axis=-1)
    return blocks, jnp.max(blocks, axis=-1), sums


def _argmax_in_blocks(blocks: jax.Array, block_max: jax.Array) -> jax.Array:
    """[B] int32: the first index of each row's maximum, from its blocks [B, N, block] and their maxima [B, N]."""
    best = jnp.argmax(block_max, axis=-1)
    inside = jnp.take_along_axis(blocks, best[:, None, None], axis=1)[:, 0]
    return (best * blocks.shape[-1] + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def _checked_argmax(x: jax.Array, blocks: jax.Array, block_max: jax.Array, sums: jax.Array) -> jax.Array:
    """The blocked argmax, or jnp.argmax over whole rows where a block sum is NaN (XLA:CPU's max skips NaN)."""
    return jax.lax.cond(jnp.any(jnp.isnan(sums)), lambda _: jnp.argmax(x, axis=-1).astype(jnp.int32),
                        lambda b: _argmax_in_blocks(b, block_max), blocks)


def blocked_argmax(x: jax.Array, block: int = ARGMAX_BLOCK) -> jax.Array:
    """`fast_argmax` without its NaN check, for blocks of `block` entries: equal to jnp.argmax(x, -1) [B] int32 for
    x [B, V] without NaN (XLA:CPU's max over a block drops NaN, so a row with NaN may differ). What
    `benchmarks/argmax_cost.py` times at other block widths."""
    blocks = _blocks(x.astype(jnp.float32), block)
    return _argmax_in_blocks(blocks, jnp.max(blocks, axis=-1))


@jax.jit  # eager callers: lax.cond outside jit would re-trace every call
def fast_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, -1) (the first index of the maximum; the first NaN where a row has one) for x [B, V], int32,
    without XLA:CPU's slow variadic (value, index) reduction over the whole row: the row is cut into blocks of
    `ARGMAX_BLOCK`; plain reductions take every block's max and sum, jnp.argmax over the block maxima picks the first
    block holding the row's maximum, and jnp.argmax runs inside that block only (exact: the first maximum of the row
    lies in the first block whose maximum equals it). ±inf entries are fine. XLA:CPU's max skips NaN, its sum does
    not: a batch with a NaN block sum (a NaN, or +inf beside −inf in one block's sum) takes jnp.argmax over whole
    rows. 1 / 8 / 16 rows of 262,144 on a 2-core CPU: 0.22 / 0.66 / 1.5 ms against jnp.argmax's 1.3 / 5.1 / 10.8 ms
    (`benchmarks/argmax_cost.py`, BENCHMARKS.md "Session 55")."""
    x = x.astype(jnp.float32)
    return _checked_argmax(x, *_block_stats(x))


@jax.jit  # eager callers: lax.cond outside jit would re-trace every call
def argmax_and_finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(`fast_argmax`(x) [B] int32, jnp.all(jnp.isfinite(x), -1) [B] bool) for x [B, V] from the block sums
    fast_argmax takes anyway: a NaN or ±inf entry makes its block's sum NaN or ±inf, so where every block sum is
    finite every entry is — and only a batch with a non-finite block sum (a non-finite entry, or finite entries whose sum overflows) reads
    its rows again for the check. What greedy rounds use instead of a separate isfinite pass over their logits
    (~0.4 ms at 8 × 262,144 on a 2-core CPU, BENCHMARKS.md "Session 56")."""
    x = x.astype(jnp.float32)
    blocks, block_max, sums = _block_stats(x)
    finite = jax.lax.cond(jnp.all(jnp.isfinite(sums)), lambda v: jnp.ones(v.shape[:1], bool),
                          lambda v: jnp.all(jnp.isfinite(v), axis=-1), x)
    return _checked_argmax(x, blocks, block_max, sums), finite


@jax.jit  # eager callers: lax.cond outside jit would re-trace every call
def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """A Gumbel-max draw per row of logits [B, V] (argmax of gumbel noise + logits, with `fast_argmax`), int32.
    key: one key per row [B] (row b's draw depends only on keys[b]: `sampling.keys`), or one key (split
    into B)."""
    keys = row_keys(key, logits.shape[0])
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], logits.dtype))(keys)
    return fast_argmax(noise + logits)

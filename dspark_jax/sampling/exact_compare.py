"""Exact comparisons from arithmetic only, and the argmax / Gumbel-max draw built on them.

XLA:CPU runs a row reduction fast only when its fused input is plain arithmetic: a compare or select in it
makes XLA materialise a [B, V] intermediate first. The full-row passes therefore compare through `gt_step`,
which is exact under the stated conditions.
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


@jax.jit  # eager callers: lax.cond outside jit would re-trace every call
def fast_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, -1) (the first index of the maximum) for x [B, V], int32, without XLA:CPU's slow variadic
    (value, index) reduction: min over (index + V · [x < max]). −inf entries are fine; a batch with NaN, a row
    maximum of ±inf, or one with 0 < |max| < 2^-100 (see `gt_step`) takes jnp.argmax itself."""
    v = x.shape[-1]
    if v >= 2 ** 23:  # float32 indices must stay exact
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    x = x.astype(jnp.float32)
    m = jnp.max(x, axis=-1, keepdims=True)  # XLA:CPU's max may skip NaN: NaN is caught by the exp sum below

    def fast(x):
        iota = jax.lax.broadcasted_iota(jnp.float32, x.shape, 1)
        return jnp.min(iota + gt_step(m, x) * v, axis=-1).astype(jnp.int32)

    ok = jnp.isfinite(jnp.sum(jnp.exp(x - m), axis=-1)) & gt_safe(m[:, 0])  # not finite: NaN, or m = ±inf
    return jax.lax.cond(jnp.all(ok), fast, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), x)


@jax.jit  # eager callers: lax.cond outside jit would re-trace every call
def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """A Gumbel-max draw per row of logits [B, V] (argmax of gumbel noise + logits, with `fast_argmax`), int32.
    key: one key per row [B] (row b's draw depends only on keys[b]: `sampling.keys`), or one key (split
    into B)."""
    keys = row_keys(key, logits.shape[0])
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], logits.dtype))(keys)
    return fast_argmax(noise + logits)

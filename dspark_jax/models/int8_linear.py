"""Projections read from int8 blocks on CPU: a GGUF's quantized layer weights (`io.gguf_blocks`), multiplied by
`q8_ffi.int8_block_matmul` instead of the float32 weights they dequantize to.

A decoding step at batch 1 reads every projection weight once: 400 MB of float32 for the embedded Gemma 3 270M's
18 layers. The GGUF's own blocks (Q5_0, Q8_0, Q4_K, Q6_K) unpacked to int8 values with float32 scales are ~115 MB,
and the kernel reads them once for all rows of a call. Calls of 1 to `INT8_MAX_ROWS` rows (decoding and
verification steps) use the blocks; more rows (a prefill) keep the float32 weights, where the product is
compute-bound. The blocks are the weights bit for bit (`with_int8_weight` checks), so the layer computes the same
values up to float summation order.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.models.q8_ffi import int8_block_matmul

INT8_MAX_ROWS = 64  # the most rows a call gives the kernel (the output head's measured range, `output_head`)


class Q8Blocks(nnx.Variable):
    """A weight stored a second way for the int8 kernel: int8 values, or float32 scales or offsets per block.
    Loaded, never trained."""


class Int8Weight(nnx.Module):
    """One projection's weight W [N, K] (the float32 parameter's transpose) as int8 blocks: values [N, K], scales
    and offsets (None: zero) [N, K / B]."""

    def __init__(self, values: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None):
        self.values = Q8Blocks(jax.device_put(values))
        self.scales = Q8Blocks(jax.device_put(scales))
        self.offsets = nnx.data(None) if offsets is None else Q8Blocks(jax.device_put(offsets))


def uses_int8_kernel(rows: int, backend: str | None = None) -> bool:
    """Whether a call of `rows` rows reads attached int8 blocks on `backend` (default: JAX's)."""
    return (backend or jax.default_backend()) == "cpu" and 1 <= rows <= INT8_MAX_ROWS


def project(x: jax.Array, weight: jax.Array, int8: Int8Weight | None) -> jax.Array:
    """x [..., K] @ weight [K, N] → [..., N]: from `int8` (the same W as int8 blocks) where attached and
    `uses_int8_kernel`, else the float32 product."""
    rows = math.prod(x.shape[:-1])
    if int8 is None or not uses_int8_kernel(rows):
        return x @ weight
    offsets = None if int8.offsets is None else int8.offsets[...]
    out = int8_block_matmul(x.reshape(rows, x.shape[-1]).astype(jnp.float32), int8.values[...], int8.scales[...],
                            offsets)
    return out.reshape(*x.shape[:-1], out.shape[-1]).astype(x.dtype)


def dequantize_blocks(values: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """W [..., K] from int8 values [..., K] and float32 scales (offsets) [..., K / B], as the kernel and gguf-py
    compute it: a product, then a difference."""
    *lead, k = values.shape
    w = values.reshape(*lead, scales.shape[-1], -1).astype(np.float32) * scales[..., None]
    if offsets is not None:
        w = w - offsets[..., None]
    return w.reshape(*lead, k)


def with_int8_weight(module: nnx.Module, name: str, values: np.ndarray, scales: np.ndarray,
                     offsets: np.ndarray | None = None) -> None:
    """Attaches int8 blocks (values int8 [N, K], scales and offsets float32 [N, K / B]) as the form of
    `module.<name>` (float32 [K, N]; the blocks hold W = its transpose) in `module.<name>_int8`. Raises ValueError
    when the blocks are not that weight bit for bit, or the weight is not float32."""
    weight = getattr(module, name)[...]
    values, scales = np.asarray(values), np.asarray(scales)
    if weight.dtype != jnp.float32:
        raise ValueError(f"{name}: int8 blocks reproduce a float32 weight, this one is {weight.dtype}")
    if values.dtype != np.int8 or values.shape != weight.shape[::-1] or scales.ndim != 2 \
            or scales.shape[0] != values.shape[0] or not scales.shape[1] or values.shape[1] % scales.shape[1] \
            or (offsets is not None and np.shape(offsets) != scales.shape):
        raise ValueError(f"{name}: int8 blocks must be int8 values {weight.shape[::-1]} (the weight's transpose) and "
                         f"scales (offsets) [N, K / B]; got {values.dtype} {values.shape}, {scales.shape}"
                         + ("" if offsets is None else f", {np.shape(offsets)}"))
    if not np.array_equal(dequantize_blocks(values, scales, offsets), np.asarray(weight).T):
        raise ValueError(f"{name}: the int8 blocks do not reproduce the float32 weight")
    setattr(module, f"{name}_int8", Int8Weight(values, scales.astype(np.float32),
                                               None if offsets is None else np.asarray(offsets, np.float32)))

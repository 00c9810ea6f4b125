"""The int8 block kernel (`models.q8_ffi`) against a float64 reference of the dequantized matrix: every row group
and tail of W, with and without offsets, inside jitted loops, bad shapes refused, and the switch that turns it
off."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.models.q8_ffi import int8_block_matmul, kernel_blocker
from tests.models.test_q8_head import q8_blocks_for

UNSUPPORTED = ("the kernel is built for", "the CPU lacks", "turned off by")


def require_kernel() -> None:
    """Skips where the kernel cannot exist (not x86-64 Linux with AVX2/FMA, or turned off); fails where it should
    build and does not (no compiler, a compile error)."""
    blocker = kernel_blocker()
    if blocker is not None and blocker.startswith(UNSUPPORTED):
        pytest.skip(blocker)
    assert blocker is None, blocker


def reference(h, table) -> np.ndarray:
    return np.asarray(h, np.float64) @ np.asarray(table, np.float64).T


def affine_blocks(v: int, d: int, block: int, seed: int = 0):
    """Random int8 values in 0..15 with scales and offsets per block (Q4_K's form) and the float32 matrix they are,
    computed as gguf-py does: a product, then a difference."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (v, d), dtype=np.int8)
    scale = (rng.random((v, d // block)) * 1e-2).astype(np.float32)
    offset = (rng.random((v, d // block)) * 1e-2).astype(np.float32)
    w = q.reshape(v, -1, block).astype(np.float32) * scale[:, :, None] - offset[:, :, None]
    return q, scale, offset, w.reshape(v, d)


# rows: one group, a full group of 8, a group and a tail; vocabulary: even, odd (a single last column), below one
# 4-wide pass, above one 2048-row chunk; blocks of 32 (Q8_0) and 16
@pytest.mark.parametrize("rows, vocab, d, block", [(1, 500, 64, 32), (2, 501, 64, 32), (3, 7, 32, 32),
                                                   (8, 2051, 96, 32), (9, 130, 64, 16), (17, 4099, 64, 32)])
def test_kernel_matches_the_dequantized_table(rows, vocab, d, block):
    require_kernel()
    q, scale, table = q8_blocks_for(vocab, d, seed=rows, block=block)
    h = jax.random.normal(jax.random.key(rows), (rows, d), jnp.float32)
    got = jax.jit(int8_block_matmul)(h, jnp.asarray(q), jnp.asarray(scale))
    assert got.shape == (rows, vocab) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, reference(h, table), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, n, k, block", [(1, 256, 640, 32), (3, 640, 2048, 16), (8, 2048, 640, 32),
                                               (13, 33, 1024, 16)])
def test_kernel_with_offsets_matches_the_dequantized_matrix(rows, n, k, block):
    require_kernel()
    q, scale, offset, w = affine_blocks(n, k, block, seed=rows)
    x = jax.random.normal(jax.random.key(rows), (rows, k), jnp.float32)
    got = jax.jit(int8_block_matmul)(x, jnp.asarray(q), jnp.asarray(scale), jnp.asarray(offset))
    assert got.shape == (rows, n)
    np.testing.assert_allclose(got, reference(x, w), rtol=1e-5, atol=1e-4)


def test_kernel_runs_inside_a_jitted_loop_with_changing_rows():
    require_kernel()
    q, scale, table = q8_blocks_for(300, 64)
    q, scale = jnp.asarray(q), jnp.asarray(scale)

    def step(i, carry):  # the next hidden rows depend on the last logits: nothing can be hoisted
        h, total = carry
        logits = int8_block_matmul(h, q, scale)
        return h * 0.5 + logits[:, :64] * 1e-3, total + logits.sum()

    h0 = jax.random.normal(jax.random.key(0), (4, 64), jnp.float32)
    h, total = jax.jit(lambda h: jax.lax.fori_loop(0, 3, step, (h, 0.0)))(h0)
    h_ref, total_ref = np.asarray(h0, np.float64), 0.0
    for _ in range(3):
        logits = reference(h_ref, table)
        h_ref, total_ref = h_ref * 0.5 + logits[:, :64] * 1e-3, total_ref + logits.sum()
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total, total_ref, rtol=1e-4)


def test_kernel_rejects_shapes_that_do_not_fit():
    require_kernel()
    q, scale, _ = q8_blocks_for(50, 64)
    q, scale = jnp.asarray(q), jnp.asarray(scale)
    with pytest.raises(ValueError, match="takes x"):
        int8_block_matmul(jnp.zeros((2, 32)), q, scale)
    with pytest.raises(ValueError, match="takes x"):
        int8_block_matmul(jnp.zeros((1, 2, 64)), q, scale)
    with pytest.raises(ValueError, match="B a multiple of 16"):
        int8_block_matmul(jnp.zeros((2, 64)), q, jnp.tile(scale[:, :1], (1, 8)))  # blocks of 8
    with pytest.raises(ValueError, match="takes x"):
        int8_block_matmul(jnp.zeros((2, 64)), q[:49], scale)
    with pytest.raises(ValueError, match="takes x"):
        int8_block_matmul(jnp.zeros((2, 64)), q, scale, scale[:, :1])  # offsets shaped unlike the scales
    with pytest.raises(ValueError, match="takes x"):  # K = 0 (the kernel would divide by a zero block)
        int8_block_matmul(jnp.zeros((2, 0)), jnp.zeros((50, 0), jnp.int8), scale)


def test_the_kernel_compiles_to_one_custom_call_without_a_float32_table():
    require_kernel()
    q, scale, _ = q8_blocks_for(4096, 64)
    hlo = jax.jit(int8_block_matmul).lower(jnp.zeros((5, 64)), jnp.asarray(q), jnp.asarray(scale)).compile().as_text()
    assert hlo.count("custom-call(") == 1 and "f32[4096,64]" not in hlo


def test_the_kernel_can_be_turned_off():
    code = "from dspark_jax.models.q8_ffi import kernel_blocker; print(kernel_blocker())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DSPARK_Q8_KERNEL": "0", "JAX_PLATFORMS": "cpu"}).stdout
    assert out.strip() == "turned off by DSPARK_Q8_KERNEL=0"

"""models.output_head: tied_logits against the plain einsum, that the fused loop is what runs, and the Q8_0 head."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.models.int8_linear import INT8_MAX_ROWS
from dspark_jax.models.output_head import (FUSED_ROWS, Q8_ROWS, HeadRows, fused_logits, fused_width, head_logits,
                                           q8_logits, tied_logits, uses_fused_loop, uses_q8_blocks)
from tests.models.test_q8_head import q8_blocks_for


def _einsum(h, t):
    return jnp.einsum("...d,vd->...v", h, t, preferred_element_type=jnp.float32)


@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (3, 24), (1, 4, 24), (2, 4, 24), (8, 24), (9, 24), (2, 6, 24),
                                   (1, 15, 24), (16, 24), (17, 24), (3, 7, 24), (24, 24), (25, 24)])
def test_matches_einsum(shape):
    kh, kt = jax.random.split(jax.random.key(0))
    h = jax.random.normal(kh, shape, jnp.float32)
    table = jax.random.normal(kt, (1000, 24), jnp.float32)
    got = jax.jit(tied_logits)(h, table)
    assert got.shape == shape[:-1] + (1000,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _einsum(h, table), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 9, 16])
def test_the_fused_loop_itself_matches_einsum_at_any_row_count(rows):
    h = jax.random.normal(jax.random.key(rows), (rows, 24), jnp.float32)
    table = jax.random.normal(jax.random.key(7), (500, 24), jnp.float32)
    np.testing.assert_allclose(jax.jit(fused_logits)(h, table), _einsum(h, table), rtol=1e-5, atol=1e-5)


def test_bfloat16_table_gives_float32_logits():
    h = jax.random.normal(jax.random.key(1), (4, 16), jnp.bfloat16)
    table = jax.random.normal(jax.random.key(2), (300, 16), jnp.bfloat16)
    got = tied_logits(h, table)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _einsum(h, table), rtol=2e-2, atol=2e-2)


def test_rejects_mismatched_hidden_size():
    with pytest.raises(ValueError, match="hidden size 8 does not match the table's 16"):
        tied_logits(jnp.zeros((2, 8)), jnp.zeros((10, 16)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fused loop is the CPU path")
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 15, 16, 17, 24, 25, 32])
def test_fused_loop_replaces_the_dot_for_few_rows(rows):
    hlo = jax.jit(tied_logits).lower(jnp.zeros((rows, 16)), jnp.zeros((64, 16))).compile().as_text()
    assert uses_fused_loop(rows) == (rows in FUSED_ROWS) == (2 <= rows <= 16 or rows == 24)
    assert ("dot(" in hlo or "dot." in hlo) != uses_fused_loop(rows)


@pytest.mark.parametrize("rows, width", [(2, 2), (8, 8), (9, 16), (15, 16), (16, 16), (24, 24)])
def test_rows_between_the_loop_groups_are_padded_to_the_next(rows, width):
    assert fused_width(rows) == width


def test_other_backends_keep_the_einsum():
    assert not uses_fused_loop(4, backend="gpu") and not uses_fused_loop(4, backend="tpu")


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (3, 64), (1, 3, 64), (4, 64), (2, 2, 64), (3, 3, 64)])
def test_q8_logits_match_the_dequantized_table(shape, kernel):
    if kernel:
        from tests.models.test_q8_ffi import require_kernel
        require_kernel()
    q, scale, table = q8_blocks_for(500, 64)
    h = jax.random.normal(jax.random.key(3), shape, jnp.float32)
    got = jax.jit(lambda *a: q8_logits(*a, kernel=kernel))(h, jnp.asarray(q), jnp.asarray(scale))
    assert got.shape == shape[:-1] + (500,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _einsum(h, jnp.asarray(table)), rtol=1e-5, atol=1e-5)


def test_q8_logits_reject_blocks_that_do_not_fit():
    q, scale, _ = q8_blocks_for(50, 64)
    with pytest.raises(ValueError, match="do not fit"):
        q8_logits(jnp.zeros((1, 32)), jnp.asarray(q), jnp.asarray(scale))
    with pytest.raises(ValueError, match="do not fit"):
        q8_logits(jnp.zeros((1, 64)), jnp.asarray(q), jnp.asarray(np.tile(scale[:, :1], (1, 3))))  # 64 % 3


def test_the_rows_read_from_q8_blocks_on_cpu():
    assert [r for r in range(0, 100) if uses_q8_blocks(r, backend="cpu")] == sorted(Q8_ROWS) == [1, 2, 3]
    with_kernel = [r for r in range(0, 100) if uses_q8_blocks(r, kernel=True, backend="cpu")]
    assert with_kernel == list(range(1, INT8_MAX_ROWS + 1)) and INT8_MAX_ROWS == 64  # the layers' rule
    for kernel in (False, True):
        assert not uses_q8_blocks(1, kernel, backend="gpu") and not uses_q8_blocks(2, kernel, backend="tpu")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fused matrix-vector loop is XLA:CPU's")
@pytest.mark.parametrize("rows", [1, 3])
def test_q8_logits_never_materialize_the_float32_table(rows):
    """The dequantization is fused into one matrix-vector dot per row: no [V, d] float32 buffer is ever written
    (it would cost what the int8 storage saves)."""
    q, scale, _ = q8_blocks_for(4096, 64)
    hlo = jax.jit(q8_logits).lower(jnp.zeros((rows, 64)), jnp.asarray(q), jnp.asarray(scale)).compile().as_text()
    assert "custom-call(" not in hlo  # without kernel=True: XLA's own loops
    entry = hlo[hlo.index("ENTRY"):].splitlines()[1:]
    results = [line.split("=", 1)[1].split()[0] for line in entry if "=" in line]
    assert results and not any(r.startswith("f32[4096,64]") for r in results)
    reads_blocks = [line for line in entry if " fusion(" in line and "%q" in line and "%scale" in line]
    assert len(reads_blocks) == rows  # one fused pass over the int8 blocks per row


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the kernel is the CPU path")
@pytest.mark.parametrize("rows", [1, 2, 15, 64, 65])
def test_head_logits_take_the_blocks_through_the_kernel_where_the_target_does(rows):
    """`HeadRows` with blocks: 2–64 rows through the kernel, one row through XLA's loop on the blocks, 65 rows
    the float32 table; a bare table or rows without blocks: `tied_logits`. Every form gives the table's logits."""
    from tests.models.test_q8_ffi import require_kernel
    require_kernel()
    q, scale, table = q8_blocks_for(300, 64, seed=rows)
    h = jax.random.normal(jax.random.key(rows), (rows, 64))
    with_blocks = HeadRows(jnp.asarray(table), jnp.asarray(q), jnp.asarray(scale))
    reference = _einsum(h, jnp.asarray(table))
    for head in (with_blocks, HeadRows(jnp.asarray(table)), jnp.asarray(table)):
        np.testing.assert_allclose(jax.jit(head_logits)(h, head), reference, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(head_logits).lower(h, with_blocks).as_text()
    assert ("dspark_int8_scaled" in hlo) == (2 <= rows <= 64)
    assert "dspark_int8_scaled" not in jax.jit(head_logits).lower(h, HeadRows(jnp.asarray(table))).as_text()

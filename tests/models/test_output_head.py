"""models.output_head.tied_logits against the plain einsum, and that the fused loop is what runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.models.output_head import FUSED_ROWS, fused_logits, fused_width, tied_logits, uses_fused_loop


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

"""KV cache prefixes: a short view for attention over the first rows, written back in place."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.models.kv_cache import KVCache


def test_prefix_then_with_prefix_replaces_only_the_first_rows():
    rng = np.random.default_rng(0)
    full = KVCache(tuple(jnp.asarray(rng.normal(size=(2, 8, 1, 4)), jnp.float32) for _ in range(2)),
                   tuple(jnp.asarray(rng.normal(size=(2, 8, 1, 4)), jnp.float32) for _ in range(2)))
    part = full.prefix(3)
    assert part.max_len == 3 and part.batch_size == 2
    np.testing.assert_array_equal(part.k[1], full.k[1][:, :3])
    changed = KVCache(tuple(a + 1 for a in part.k), tuple(a - 1 for a in part.v))
    back = full.with_prefix(changed)
    for new, old, delta in ((back.k[0], full.k[0], 1), (back.v[1], full.v[1], -1)):
        np.testing.assert_array_equal(new[:, :3], old[:, :3] + delta)
        np.testing.assert_array_equal(new[:, 3:], old[:, 3:])


@pytest.mark.parametrize("rows", [0, 9])
def test_prefix_outside_the_cache_is_an_error(rows):
    full = KVCache((jnp.zeros((1, 8, 1, 4)),), (jnp.zeros((1, 8, 1, 4)),))
    with pytest.raises(ValueError, match="prefix rows must be in 1..8"):
        full.prefix(rows)

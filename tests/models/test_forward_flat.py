"""`Transformer.forward_flat` with the cache only read (`write=False`, the tokens' K/V returned and written
afterwards with `KVRows`) against the forward that writes them first: same hidden states, taps and cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.decoding.verification import _kv_rows
from dspark_jax.models.kv_cache import init_cache
from dspark_jax.models.layout import make_layout
from dspark_jax.models.transformer import Transformer
from dspark_jax.testing.tiny_configs import tiny_gemma3, tiny_qwen3


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_read_only_forward_then_write_equals_writing_forward(family):
    cfg = tiny_gemma3() if family == "gemma3" else tiny_qwen3()
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    b, p, cache_len = 4, 7, 24
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(1, cfg.vocab_size, (b, p)), jnp.int32)
    start = jnp.asarray([7, 3, 5, 6], jnp.int32)  # next position per request (earlier slots: its context)
    lengths = jnp.asarray([3, 1, 0, 4], jnp.int32)  # request 2 verifies nothing this round
    layout = make_layout(lengths, start, 10, 4)  # 8 tokens and 2 padding rows
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, 10), jnp.int32)

    @jax.jit
    def both(state):
        model = nnx.merge(graphdef, state)
        pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
        cache = model(prompts, pos, init_cache(cfg, b, cache_len), jnp.zeros((b,), jnp.int32)).cache
        written = model.forward_flat(tokens, layout, cache, tap_layers=(0, 1))
        read = model.forward_flat(tokens, layout, cache, tap_layers=(0, 1), write=False)
        assert read.cache is None and written.new_k is None
        return written, read, _kv_rows(read, layout).padded(6).write(cache)

    written, read, cache = both(state)
    valid = np.asarray(layout.position) >= 0
    np.testing.assert_allclose(np.asarray(read.hidden)[valid], np.asarray(written.hidden)[valid], atol=1e-5, rtol=1e-5)
    for a, c in zip(read.taps, written.taps):
        np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(c)[valid], atol=1e-5, rtol=1e-5)
    for a, c in zip(cache.k + cache.v, written.cache.k + written.cache.v):  # deeper layers: float summation order
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.k[0]), np.asarray(written.cache.k[0]))  # same rows written

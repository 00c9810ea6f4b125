"""Pallas attention kernels against their pure-JAX references (interpret mode on CPU), the Triton/Mosaic
lowerings (traced for cuda/tpu without a device), and a tiny model forward through the kernels."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.testing.tiny_configs import tiny_gemma3
from dspark_jax.drafters.config import make_drafter_config
from dspark_jax.drafters.dspark import DSparkDrafter
from dspark_jax.models.attn_impl import with_attn_impl
from dspark_jax.models.kv_cache import init_cache
from dspark_jax.models.transformer import Transformer
from pallas_kernels import dispatch, gpu_attention, reference, tpu_attention
from pallas_kernels.folding import causal_bounds, fold_queries, unfold_output

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)


def _positions(rng, b: int, t: int, s: int) -> jax.Array:
    """Right-padded verification positions: request 0 has q_len=1, request 1 q_len=T, request 2 kv_len=q_len,
    request 3 is all padding, the rest random. Request i verifies q_len tokens ending at kv_len - 1."""
    rows = np.full((b, t), -1, np.int32)
    for i in range(b):
        q_len = [1, t, t, 0][i] if i < 4 else int(rng.integers(1, t + 1))
        kv_len = [s, s - 3, q_len, s][i] if i < 4 else int(rng.integers(q_len, s + 1))
        rows[i, :q_len] = np.arange(kv_len - q_len, kv_len)
    return jnp.asarray(rows)


def _check(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


CASES = [  # (H, KVH, D, S, T, window, dtype)
    (2, 2, 16, 100, 4, None, jnp.float32),   # MHA, S not a multiple of the 64-key block
    (4, 2, 16, 100, 4, 7, jnp.float32),      # GQA + sliding window
    (4, 1, 32, 70, 8, None, jnp.float32),    # MQA, 32 folded rows
    (4, 2, 16, 100, 4, None, jnp.bfloat16),
    (4, 1, 32, 70, 3, 5, jnp.bfloat16),
]


@pytest.mark.parametrize("h,kvh,d,s,t,window,dtype", CASES)
def test_verification_attention_matches_reference(h, kvh, d, s, t, window, dtype):
    rng = np.random.default_rng(h * 100 + s + t)
    b = 5
    q, k, v = (_normal(rng, (b, t, h, d), dtype), _normal(rng, (b, s, kvh, d), dtype),
               _normal(rng, (b, s, kvh, d), dtype))
    pos = _positions(rng, b, t, s)
    ref = reference.causal_attention(q, k, v, pos, scale=d ** -0.5, window=window)
    out = dispatch.attention(q, k, v, pos, scale=d ** -0.5, window=window, impl="interpret")
    assert out.dtype == dtype
    _check(out, ref, dtype)
    assert (np.asarray(out)[np.asarray(pos) < 0] == 0).all()  # padded rows: exact zeros


@pytest.mark.parametrize("splits", [1, 3])
def test_split_k_and_shifted_tail_block(splits):
    """block_k=16 over S=45: three full blocks and a tail block shifted back to end at S; 3 KV splits."""
    rng = np.random.default_rng(splits)
    b, t, h, kvh, d, s = 3, 2, 4, 2, 16, 45
    q, k, v = _normal(rng, (b, t, h, d), jnp.float32), _normal(rng, (b, s, kvh, d), jnp.float32), \
        _normal(rng, (b, s, kvh, d), jnp.float32)
    pos = jnp.asarray([[43, 44], [20, 21], [-1, -1]], jnp.int32)
    lo, hi = causal_bounds(pos, h // kvh, 16, s, 9)
    out = gpu_attention.ranged_attention(fold_queries(q, kvh, 16), lo, hi, k, v, scale=0.25, interpret=True,
                                         config=gpu_attention.GpuConfig(block_k=16, k_splits=splits))
    _check(unfold_output(out, t, h), reference.causal_attention(q, k, v, pos, scale=0.25, window=9), jnp.float32)


@pytest.mark.parametrize("key", sorted(gpu_attention.TUNED))
def test_every_tuned_tile_config_matches_reference(key):
    """Each committed tile config (`gpu_attention.TUNED`) on its own (dtype, head_dim, rows): causal verification
    of rows / 4 tokens (GQA group 4) over S = 150 keys (3+ blocks of every tile's block_k, the last one shifted
    back to end at S), one and three KV splits. (Interpret mode ignores num_warps / num_stages: their legality is
    the Triton lowering's, `test_tuned_tiles_lower_for_gpu`.)"""
    dtype, d, rows = key
    dtype = jnp.dtype(dtype).type
    rng = np.random.default_rng(rows + d)
    b, kvh, group, s = 2, 1, 4, 150
    t = rows // group
    q, k, v = _normal(rng, (b, t, group, d), dtype), _normal(rng, (b, s, kvh, d), dtype), \
        _normal(rng, (b, s, kvh, d), dtype)
    pos = jnp.asarray([np.arange(s - t, s), np.r_[np.arange(10, 10 + t - 1), -1]], jnp.int32)
    lo, hi = causal_bounds(pos, group, rows, s, None)
    ref = reference.causal_attention(q, k, v, pos, scale=d ** -0.5)
    for splits in (1, 3):
        cfg = dataclasses.replace(gpu_attention.TUNED[key], k_splits=splits)
        out = gpu_attention.ranged_attention(fold_queries(q, kvh, rows), lo, hi, k, v, scale=d ** -0.5,
                                             interpret=True, config=cfg)
        _check(unfold_output(out, t, group), ref, dtype)


def test_dispatch_passes_the_tuned_tiles_of_its_shape(monkeypatch):
    """On the Triton path `dispatch` hands the kernel TUNED's config for (dtype, head_dim, folded rows) — here
    float32, D 256, 16 tokens x group 4 = 64 rows — and GpuConfig() for a shape TUNED does not list."""
    seen = []

    def spy(q, lo, hi, *kv, scale, interpret, config):
        seen.append((q.dtype.name, q.shape[3], q.shape[2], config, interpret))
        return jnp.zeros_like(q)

    monkeypatch.setattr(dispatch, "kernel_backend", lambda impl: "triton")
    monkeypatch.setattr(gpu_attention, "ranged_attention", spy)
    b, s = 1, 40
    for t, h, kvh, d in ((16, 4, 1, 256), (16, 4, 1, 64)):
        q, kv = jnp.zeros((b, t, h, d), jnp.float32), jnp.zeros((b, s, kvh, d), jnp.float32)
        dispatch.attention(q, kv, kv, jnp.arange(s - t, s, dtype=jnp.int32)[None], scale=0.1, impl="pallas")
    assert seen[0][:3] == ("float32", 256, 64) and seen[0][3] == gpu_attention.TUNED[("float32", 256, 64)]
    assert ("float32", 64, 64) not in gpu_attention.TUNED and seen[1][3] == gpu_attention.GpuConfig()
    assert not seen[0][4]


def test_tuned_tiles_lower_for_gpu():
    """Every TUNED config lowers to Triton for its shape (block shapes, warps, stages legal; no device needed)."""
    for (dtype, d, rows), cfg in sorted(gpu_attention.TUNED.items()):
        q, kv = jnp.zeros((2, 1, rows, d), dtype), jnp.zeros((2, 300, 1, d), dtype)
        lo = jnp.zeros((2, rows), jnp.int32)

        def gpu(q, lo, hi, k, v, cfg=cfg):
            return gpu_attention.ranged_attention(q, lo, hi, k, v, scale=0.1, config=cfg)
        assert "triton" in jax.jit(gpu).trace(q, lo, lo, kv, kv).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_block_attention_matches_reference(dtype):
    rng = np.random.default_rng(7)
    b, g, h, kvh, d, s = 4, 4, 4, 2, 16, 90
    q, blk_k, blk_v = (_normal(rng, (b, g, h, d), dtype), _normal(rng, (b, g, kvh, d), dtype),
                       _normal(rng, (b, g, kvh, d), dtype))
    ctx_k, ctx_v = _normal(rng, (b, s, kvh, d), dtype), _normal(rng, (b, s, kvh, d), dtype)
    ctx_len = jnp.asarray([0, 1, 50, s], jnp.int32)
    ref = reference.block_attention(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v, scale=0.3)
    out = dispatch.block_attention(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v, scale=0.3, impl="interpret")
    _check(out, ref, dtype)


def test_tpu_kernel_in_tpu_interpret_mode(monkeypatch):
    """The Mosaic kernel's semantics (causal + window, padding, block attention) under TPU interpret mode."""
    monkeypatch.setattr(dispatch, "kernel_backend", lambda impl: "mosaic")
    rng = np.random.default_rng(3)
    b, t, h, kvh, d, s = 4, 3, 4, 2, 16, 150
    q, k, v = _normal(rng, (b, t, h, d), jnp.float32), _normal(rng, (b, s, kvh, d), jnp.float32), \
        _normal(rng, (b, s, kvh, d), jnp.float32)
    pos = _positions(rng, b, t, s)
    out = dispatch.attention(q, k, v, pos, scale=0.25, window=20, impl="pallas")
    _check(out, reference.causal_attention(q, k, v, pos, scale=0.25, window=20), jnp.float32)
    ctx_len = jnp.asarray([0, 3, 130, s], jnp.int32)
    out = dispatch.block_attention(q, k, v, ctx_len, k[:, :t], v[:, :t], scale=0.25, impl="pallas")
    _check(out, reference.block_attention(q, k, v, ctx_len, k[:, :t], v[:, :t], scale=0.25), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_gpu_and_tpu(dtype):
    """Triton and Mosaic lowerings succeed (shape/op legality) for realistic shapes; needs no device."""
    b, kvh, rows, d, s = 2, 2, 32, 128, 1000
    q, kv = jnp.zeros((b, kvh, rows, d), dtype), jnp.zeros((b, s, kvh, d), dtype)
    lo = jnp.zeros((b, rows), jnp.int32)
    for cfg in (gpu_attention.GpuConfig(k_splits=1), gpu_attention.GpuConfig(k_splits=4)):
        def gpu(q, lo, hi, k, v, cfg=cfg):
            return gpu_attention.ranged_attention(q, lo, hi, k, v, k[:, :5], v[:, :5], scale=0.1, config=cfg)
        text = jax.jit(gpu).trace(q, lo, lo, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text

    def tpu(q, lo, hi, k, v):
        return tpu_attention.ranged_attention(q, lo, hi, k, v, scale=0.1)
    assert "tpu_custom_call" in jax.jit(tpu).trace(q, lo, lo, kv, kv).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("impl", ["reference", "interpret"])
@pytest.mark.parametrize("h,kvh,d,s,t,window,dtype", CASES[:3])
def test_prefix_attention_equals_attention_over_the_written_cache(impl, h, kvh, d, s, t, window, dtype):
    """New tokens against a read-only cache prefix plus their own keys = causal attention over the cache with
    the new keys written at their positions; stale slots at and past each request's first new position (huge
    values here, which would dominate any query that read them) are never read."""
    rng = np.random.default_rng(h * 10 + t)
    b = 5
    pos = _positions(rng, b, t, s)
    q = _normal(rng, (b, t, h, d), dtype)
    k_new, v_new = _normal(rng, (b, t, kvh, d), dtype), _normal(rng, (b, t, kvh, d), dtype)
    k, v = _normal(rng, (b, s, kvh, d), dtype), _normal(rng, (b, s, kvh, d), dtype)
    first = np.where(np.asarray(pos)[:, 0] >= 0, np.asarray(pos)[:, 0], 0)
    stale = np.arange(s)[None, :] >= first[:, None]
    k_old = jnp.where(stale[..., None, None], jnp.asarray(1e3, dtype), k)
    v_old = jnp.where(stale[..., None, None], jnp.asarray(1e3, dtype), v)
    rows = np.where(np.asarray(pos) >= 0, np.asarray(pos), s)
    at = (np.arange(b)[:, None], rows)
    written_k = k.at[at].set(k_new, mode="drop")
    written_v = v.at[at].set(v_new, mode="drop")
    ref = reference.causal_attention(q, written_k, written_v, pos, scale=d ** -0.5, window=window)
    out = dispatch.prefix_attention(q, k_old, v_old, jnp.asarray(pos[:, 0]), k_new, v_new, pos, pos,
                                    scale=d ** -0.5, window=window, impl=impl)
    _check(out, ref, dtype)
    assert (np.asarray(out)[np.asarray(pos) < 0] == 0).all()


def test_dispatch_resolution_and_fallbacks():
    assert dispatch.kernel_backend("auto") == "reference"  # CPU
    assert dispatch.kernel_backend("pallas") == "interpret"
    assert dispatch.kernel_backend(dispatch.AttentionImpl.INTERPRET) == "interpret"
    with pytest.raises(ValueError):
        dispatch.kernel_backend("cudnn")
    rng = np.random.default_rng(0)
    q, k = _normal(rng, (1, 2, 2, 8), jnp.float32), _normal(rng, (1, 6, 2, 8), jnp.float32)
    pos, kv_pos = jnp.asarray([[3, 4]]), jnp.asarray([[0, 1, 2, 3, 4, -1]])
    out = dispatch.attention(q, k, k, pos, scale=0.3, kv_positions=kv_pos, impl="pallas")  # -> reference
    np.testing.assert_array_equal(out, reference.causal_attention(q, k, k, pos, scale=0.3, kv_positions=kv_pos))


def test_tiny_models_same_outputs_through_kernels():
    """Target prefill + a multi-token verify step with padded rows (sliding + global layer, GQA), and the DSpark
    drafter's block attention, give the same outputs with attn_impl="interpret" as with "reference"."""
    cfg = tiny_gemma3(num_layers=2)  # one sliding-window and one global layer
    target = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    dc = make_drafter_config("dspark", cfg, block_size=4, num_layers=1, markov_rank=8)
    drafter = nnx.split(DSparkDrafter(dc, cfg, rngs=nnx.Rngs(1)))
    b, p = 3, 6
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (b, p)), jnp.int32)
    lens = jnp.asarray([6, 2, 4], jnp.int32)
    feats = jnp.asarray(rng.normal(size=(b, 8, len(dc.target_layer_ids) * cfg.hidden_size)), jnp.float32)

    def run(t_state, d_state, impl):  # the implementation is a static field of each graph definition
        return _run(with_attn_impl(*target, impl), t_state, with_attn_impl(*drafter, impl), d_state)

    @jax.jit(static_argnames=("t_graph", "d_graph"))
    def _run(t_graph, t_state, d_graph, d_state):
        model, dr = nnx.merge(t_graph, t_state), nnx.merge(d_graph, d_state)
        pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
        out = model(tokens, pos, init_cache(cfg, b, 24), jnp.zeros((b,), jnp.int32))
        step = lens[:, None] + jnp.arange(4, dtype=jnp.int32)[None]
        step = jnp.where(jnp.arange(4)[None] < jnp.asarray([[4], [1], [3]]), step, -1)  # padded verify rows
        out2 = model(tokens[:, :4], step, out.cache, lens)
        ctx = dr.write_context(dr.init_state(b, 16), feats, jnp.zeros((b,), jnp.int32))
        hid = dr.backbone(model, jnp.asarray([3, 4, 5]), jnp.asarray([8, 2, 0], jnp.int32), ctx)
        return model.logits(out.hidden), model.logits(out2.hidden), hid

    for a, r in zip(run(target[1], drafter[1], "interpret"), run(target[1], drafter[1], "reference")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5, rtol=1e-5)
    assert nnx.merge(with_attn_impl(*target, "interpret"), target[1]).attn_impl == "interpret"
    assert nnx.merge(with_attn_impl(*drafter, "interpret"), drafter[1]).attn_impl == "interpret"
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        with_attn_impl(*target, "cuda")

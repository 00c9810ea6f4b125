"""Layer projections from int8 blocks (`models.int8_linear`, `target.attach_int8_layers`): the same products as
the float32 weights at the rows the kernel serves and the float32 product itself beyond, the same greedy tokens
plain and speculative, blocks that are not the weights refused, and a GGUF's blocks attached."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.models.int8_linear import (INT8_MAX_ROWS, dequantize_blocks, project, uses_int8_kernel,
                                           with_int8_weight)
from dspark_jax.models.transformer import Transformer
from dspark_jax.testing.tiny_configs import tiny_gemma3
from tests.models.test_q8_ffi import affine_blocks, require_kernel
from tests.models.test_q8_head import q8_blocks_for

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def int8_model(config, seed: int = 0, attach: bool = True) -> Transformer:
    """A random tiny model whose projections are int8 blocks (Q8_0-like, and Q4_K-like with offsets for the MLP's
    down projection), attached (`attach`) or not."""
    model = Transformer(config, rngs=nnx.Rngs(seed))
    for i, layer in enumerate(model.layers):
        for part, names in PROJECTIONS.items():
            module = getattr(layer, part)
            for j, name in enumerate(names):
                k, n = getattr(module, name)[...].shape
                if name == "down_proj":
                    q, scale, offset, w = affine_blocks(n, k, 16, seed=100 * i + j)
                else:
                    (q, scale, w), offset = q8_blocks_for(n, k, seed=100 * i + j, block=32), None
                getattr(module, name)[...] = jnp.asarray(w.T)
                if attach:
                    with_int8_weight(module, name, q, scale, offset)
    return model


def test_rows_served_by_the_kernel():
    assert [r for r in range(0, 100) if uses_int8_kernel(r, backend="cpu")] == list(range(1, INT8_MAX_ROWS + 1))
    assert not uses_int8_kernel(1, backend="gpu")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="int8 blocks are the CPU path")
def test_project_gives_the_float32_product():
    require_kernel()
    cfg = tiny_gemma3()
    mlp, mlp_f32 = int8_model(cfg).layers[0].mlp, int8_model(cfg, attach=False).layers[0].mlp
    assert mlp.down_proj_int8 is not None and mlp_f32.down_proj_int8 is None
    for shape in [(1, 1), (2, 3), (8,), (1, INT8_MAX_ROWS)]:  # the kernel
        x = jax.random.normal(jax.random.key(len(shape)), (*shape, cfg.intermediate_size))
        got = jax.jit(lambda x: project(x, mlp.down_proj[...], mlp.down_proj_int8))(x)
        np.testing.assert_allclose(got, x @ mlp_f32.down_proj[...], rtol=1e-5, atol=1e-5)
    x = jax.random.normal(jax.random.key(0), (1, INT8_MAX_ROWS + 1, cfg.intermediate_size))  # a prefill: float32
    np.testing.assert_array_equal(project(x, mlp.down_proj[...], mlp.down_proj_int8), x @ mlp.down_proj[...])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="int8 blocks are the CPU path")
def test_int8_layers_decode_the_same_tokens_plain_and_speculative():
    from tests.decoding.test_speculative import PROMPTS, _batch, make_drafter

    from dspark_jax.decoding.autoregressive import generate
    from dspark_jax.decoding.speculative import speculative_generate
    from dspark_jax.sampling import SamplingParams
    require_kernel()
    cfg = tiny_gemma3()
    with_blocks, f32 = nnx.split(int8_model(cfg)), nnx.split(int8_model(cfg, attach=False))
    tokens, lens = _batch(PROMPTS)
    kw = dict(max_new_tokens=17, stop_ids=())
    plain = generate(*f32, tokens, lens, jax.random.key(0), SamplingParams.create(3), **kw)
    plain_int8 = generate(*with_blocks, tokens, lens, jax.random.key(0), SamplingParams.create(3), **kw)
    dg, ds = make_drafter("dspark", cfg, 4, False)
    spec = speculative_generate(*with_blocks, dg, ds, tokens, lens, jax.random.key(5), SamplingParams.create(3),
                                jnp.float32(0.0), **kw)
    for run in (plain_int8, spec):
        np.testing.assert_array_equal(np.asarray(run.num_tokens), np.asarray(plain.num_tokens))
        np.testing.assert_array_equal(np.asarray(run.tokens)[:, :17], np.asarray(plain.tokens)[:, :17])


def test_blocks_that_are_not_the_weight_are_refused():
    cfg = tiny_gemma3()
    module = int8_model(cfg, attach=False).layers[0].self_attn
    k, n = module.q_proj[...].shape
    q, scale, w = q8_blocks_for(n, k, seed=0, block=32)
    wrong = q.copy()
    wrong[3, 5] = q[3, 5] + (1 if q[3, 5] < 127 else -1)
    with pytest.raises(ValueError, match="q_proj: the int8 blocks do not reproduce the float32 weight"):
        with_int8_weight(module, "q_proj", wrong, scale)
    with pytest.raises(ValueError, match="the weight's transpose"):
        with_int8_weight(module, "q_proj", q[:-1], scale[:-1])
    with pytest.raises(ValueError, match="the weight's transpose"):
        with_int8_weight(module, "q_proj", q, scale, scale[:-1])  # offsets shaped unlike the scales
    bf16 = Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)).layers[0].self_attn
    with pytest.raises(ValueError, match="reproduce a float32 weight, this one is bfloat16"):
        with_int8_weight(bf16, "q_proj", q, scale)
    assert module.q_proj_int8 is None  # nothing attached by a refused call
    np.testing.assert_array_equal(dequantize_blocks(q, scale, None), w)


def test_a_ggufs_blocks_are_attached_to_its_projections(tmp_path, monkeypatch):
    """Q8_0 and Q5_0 projections are attached, an F32 one is not; the model's outputs stay the float32 model's."""
    gguf = pytest.importorskip("gguf")
    from tests.io.test_gguf_loading import write_tiny_qwen3_gguf

    from dspark_jax.io.gguf_loader import load_gguf_weights
    from dspark_jax.models.transformer import model_from_canonical
    from dspark_jax.target import attach_int8_layers
    require_kernel()
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    q8, q5 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0
    write_tiny_qwen3_gguf(tmp_path / "t.gguf", hidden=32, raw_types={
        "blk.0.attn_q.weight": q8, "blk.0.attn_k.weight": q5, "blk.0.attn_v.weight": q8, "blk.0.ffn_gate.weight": q5,
        "blk.0.ffn_up.weight": q8, "blk.0.ffn_down.weight": q5})  # attn_output [32, 16] (in: 16): F32
    config, tensors, file = load_gguf_weights(tmp_path / "t.gguf")
    model, f32 = model_from_canonical(config, tensors, jnp.float32), model_from_canonical(config, tensors, jnp.float32)
    assert attach_int8_layers(model, file, config.family) == 6

    def corrupted(name, int8_blocks=file.int8_blocks):  # one projection's blocks that are not its weights
        blocks = int8_blocks(name)
        if name == "blk.0.attn_q.weight":
            values = blocks.values.copy()
            values[0, 0] = values[0, 0] + (1 if values[0, 0] < 127 else -1)
            blocks = dataclasses.replace(blocks, values=values)
        return blocks

    monkeypatch.setattr(file, "int8_blocks", corrupted)
    with pytest.raises(ValueError, match="q_proj: the int8 blocks do not reproduce"):
        attach_int8_layers(model_from_canonical(config, tensors, jnp.float32), file, config.family)
    lenient = model_from_canonical(config, tensors, jnp.float32)
    assert attach_int8_layers(lenient, file, config.family, strict=False) == 5  # q_proj keeps its float32 weights
    assert lenient.layers[0].self_attn.q_proj_int8 is None
    assert model.layers[0].self_attn.o_proj_int8 is None and model.layers[0].mlp.down_proj_int8 is not None
    x = jax.random.normal(jax.random.key(0), (1, 3, 32))
    np.testing.assert_allclose(model.layers[0].mlp(x), f32.layers[0].mlp(x), rtol=1e-5, atol=1e-5)

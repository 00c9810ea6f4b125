"""The output head reading the tied embedding's Q8_0 blocks (`models.transformer.with_q8_head`): the same logits as
the float32 table, the rows it serves, bad blocks refused; the GGUF's blocks; when `load_target` attaches them."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.models.transformer import Transformer, with_q8_head
from dspark_jax.testing.tiny_configs import tiny_gemma3, tiny_qwen3

gguf = pytest.importorskip("gguf")


def q8_blocks_for(v: int, d: int, seed: int = 0, block: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random Q8_0 blocks (values, scales) and the float32 table they are."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (v, d), dtype=np.int8)
    scale = (rng.random((v, d // block)) * 2e-3).astype(np.float16).astype(np.float32)
    return q, scale, (q.reshape(v, -1, block) * scale[:, :, None]).reshape(v, d)


def q8_model(config, seed: int = 0, attach: bool = True, kernel: bool | None = False) -> Transformer:
    """A random tiny model whose embedding is a Q8_0 table, with the blocks attached (`attach`) or not; `kernel`
    as `with_q8_head`'s."""
    model = Transformer(config, rngs=nnx.Rngs(seed))
    q, scale, table = q8_blocks_for(config.vocab_size, config.hidden_size, seed)
    model.embed_tokens[...] = jnp.asarray(table)
    return with_q8_head(model, q, scale, kernel=kernel) if attach else model


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the Q8_0 head is the CPU path")
@pytest.mark.parametrize("kernel", [False, True])
def test_the_q8_head_gives_the_tables_logits_and_decodes_the_same(kernel):
    from dspark_jax.decoding.autoregressive import generate
    from dspark_jax.sampling import SamplingParams
    if kernel:
        from tests.models.test_q8_ffi import require_kernel
        require_kernel()
    cfg = tiny_gemma3()
    with_blocks, table_only = q8_model(cfg, kernel=kernel), q8_model(cfg, attach=False)
    assert "head_q8_values" in nnx.state(with_blocks) and "head_q8_values" not in nnx.state(table_only)
    assert with_blocks.head_q8_kernel == kernel
    h = jax.random.normal(jax.random.key(0), (2, 4, cfg.hidden_size))
    for rows in (h[0, :1], h[0, :2], h[0, :3], h[:1, :3]):  # 1–3 rows: the blocks
        np.testing.assert_allclose(with_blocks.logits(rows), table_only.logits(rows), rtol=1e-5, atol=1e-5)
    if kernel:  # 8 rows: the blocks through the kernel
        np.testing.assert_allclose(with_blocks.logits(h), table_only.logits(h), rtol=1e-5, atol=1e-5)
    else:  # 8 rows: the table itself
        np.testing.assert_array_equal(with_blocks.logits(h), table_only.logits(h))
    prompts = jnp.asarray(np.random.default_rng(1).integers(1, cfg.vocab_size, (1, 6)), jnp.int32)
    outs = [generate(*nnx.split(m), prompts, jnp.asarray([6], jnp.int32), jax.random.split(jax.random.key(0), 1),
                     SamplingParams.create(1), max_new_tokens=12, stop_ids=()).tokens for m in (with_blocks, table_only)]
    np.testing.assert_array_equal(*outs)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the Q8_0 head is the CPU path")
def test_speculative_decoding_through_the_kernel_equals_plain_decoding_on_the_table():
    """Verification rounds compute 2–15 rows per call (the kernel) where plain decoding computes one (XLA's loop):
    the greedy tokens are the same as plain decoding's on the float32 table."""
    from tests.decoding.test_speculative import PROMPTS, _batch, make_drafter
    from tests.models.test_q8_ffi import require_kernel

    from dspark_jax.decoding.autoregressive import generate
    from dspark_jax.decoding.speculative import speculative_generate
    from dspark_jax.sampling import SamplingParams
    require_kernel()
    cfg = tiny_gemma3()
    tg, ts = nnx.split(q8_model(cfg, kernel=True))
    dg, ds = make_drafter("dspark", cfg, 4, False)
    tokens, lens = _batch(PROMPTS)
    kw = dict(max_new_tokens=17, stop_ids=())
    plain = generate(*nnx.split(q8_model(cfg, attach=False)), tokens, lens, jax.random.key(0),
                     SamplingParams.create(3), **kw)
    spec = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(5), SamplingParams.create(3),
                                jnp.float32(0.0), **kw)
    np.testing.assert_array_equal(np.asarray(spec.num_tokens), np.asarray(plain.num_tokens))
    np.testing.assert_array_equal(np.asarray(spec.tokens)[:, :17], np.asarray(plain.tokens)[:, :17])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the Q8_0 head is the CPU path")
def test_a_drafters_head_reads_the_targets_blocks_of_its_vocabulary():
    """`draft_head` gathers the draft vocabulary's rows of the target's Q8_0 blocks beside its float32 rows where
    the target's head runs the kernel (a hybrid's through its model); the drafter's logits through them are the
    table's, its propose calls the kernel, and without the kernel the rows are the table alone."""
    from tests.decoding.test_speculative import make_drafter
    from tests.models.test_q8_ffi import require_kernel

    from dspark_jax.decoding.speculative import draft_head
    from dspark_jax.drafters.hybrid import HybridDrafter
    from dspark_jax.drafters.ngram import NgramConfig, NgramDrafter
    from dspark_jax.models.output_head import HeadRows
    from dspark_jax.sampling import FilterMode, SamplingParams
    require_kernel()
    cfg = tiny_gemma3()
    target = q8_model(cfg, kernel=True)
    dg, ds = make_drafter("dspark", cfg, 4, reduced=True)
    drafter = nnx.merge(dg, ds)
    rows = draft_head(*nnx.split(target), dg, ds)
    ids = np.asarray(drafter.draft_to_target[...])
    q, scale, table = q8_blocks_for(cfg.vocab_size, cfg.hidden_size)
    assert isinstance(rows, HeadRows) and rows.q8_values.shape == (40, cfg.hidden_size)
    np.testing.assert_array_equal(rows.q8_values, q[ids])
    np.testing.assert_array_equal(rows.q8_scales, scale[ids])
    np.testing.assert_array_equal(rows.table, table[ids])
    hidden = jax.random.normal(jax.random.key(2), (3, 4, cfg.hidden_size))
    np.testing.assert_allclose(jax.jit(drafter.base_logits)(hidden, rows),
                               jax.jit(drafter.base_logits)(hidden, rows.table), rtol=1e-5, atol=1e-5)
    state = drafter.init_state(3, 32)
    hlo = jax.jit(lambda r: drafter.propose(target, state, jnp.ones((3,), jnp.int32), jnp.zeros((3,), jnp.int32),
                                            jax.random.key(0), SamplingParams.create(3), FilterMode(), r)
                  ).lower(rows).as_text()
    assert "dspark_int8_scaled" in hlo
    hybrid = HybridDrafter(drafter, NgramDrafter(NgramConfig(block_size=4), cfg.vocab_size))
    np.testing.assert_array_equal(hybrid.head_rows(target).q8_values, rows.q8_values)
    plain = draft_head(*nnx.split(q8_model(cfg, kernel=False)), dg, ds)
    assert plain.q8_values is None and plain.q8_scales is None
    np.testing.assert_array_equal(plain.table, rows.table)


def test_blocks_that_are_not_the_table_are_refused():
    cfg = tiny_gemma3()
    model = q8_model(cfg, attach=False)
    q, scale, _ = q8_blocks_for(cfg.vocab_size, cfg.hidden_size)
    wrong = q.copy()
    wrong[40, 3] = q[40, 3] + (1 if q[40, 3] < 127 else -1)
    with pytest.raises(ValueError, match="do not reproduce the embedding table .*rows 0..96"):
        with_q8_head(model, wrong, scale)
    with pytest.raises(ValueError, match="must be int8 values"):
        with_q8_head(model, q.astype(np.int16), scale)
    with pytest.raises(ValueError, match="must be int8 values"):
        with_q8_head(model, q, scale[:, :0])
    with pytest.raises(ValueError, match="needs tied embeddings"):
        with_q8_head(Transformer(tiny_qwen3(tie=False), rngs=nnx.Rngs(0)), q, scale)
    bf16 = Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="reproduces a float32 table, this model's is bfloat16"):
        with_q8_head(bf16, q, scale)
    assert "head_q8_values" not in nnx.state(model)  # nothing attached by a refused call


def _tiny_gguf(path, embed_type):
    """A 1-layer Qwen 3 GGUF (hidden 32) whose token embedding is stored as `embed_type`; returns its float32 values."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from tests.io.test_gguf_loading import write_tiny_qwen3_gguf
    written = write_tiny_qwen3_gguf(path, hidden=32, raw_types={"token_embd.weight": embed_type})
    embed = written["token_embd.weight"]
    if embed_type == GGMLQuantizationType.Q8_0:
        embed = dequantize(quantize(embed, embed_type), embed_type).reshape(embed.shape)
    return embed


def test_the_gguf_blocks_are_its_dequantized_tensor(tmp_path):
    from gguf import GGMLQuantizationType

    from dspark_jax.io.gguf_file import GGUFError, GGUFFile
    expected = _tiny_gguf(tmp_path / "q8.gguf", GGMLQuantizationType.Q8_0)
    f = GGUFFile(tmp_path / "q8.gguf")
    assert f.is_q8_0("token_embd.weight") and not f.is_q8_0("output_norm.weight")
    q, scale = f.q8_0_blocks("token_embd.weight")
    assert q.dtype == np.int8 and q.shape == (50, 32) and scale.shape == (50, 1)
    np.testing.assert_array_equal(q * scale, f.dequantize("token_embd.weight"))
    np.testing.assert_array_equal(q * scale, expected)
    assert f.q8_0_blocks("output_norm.weight") is None
    with pytest.raises(GGUFError, match="missing tensor 'nope'"):
        f.q8_0_blocks("nope")


def test_when_a_target_can_read_the_blocks(tmp_path):
    from gguf import GGMLQuantizationType

    from dspark_jax.io.gguf_file import GGUFFile
    from dspark_jax.io.gguf_loader import config_from_gguf
    from dspark_jax.target import q8_head_blocker
    _tiny_gguf(tmp_path / "q8.gguf", GGMLQuantizationType.Q8_0)
    _tiny_gguf(tmp_path / "f32.gguf", GGMLQuantizationType.F32)
    q8, f32 = GGUFFile(tmp_path / "q8.gguf"), GGUFFile(tmp_path / "f32.gguf")
    cfg = config_from_gguf(q8)
    expect_cpu = None if jax.default_backend() == "cpu" else "the backend is"
    blocker = q8_head_blocker(cfg, jnp.float32, None, q8)
    assert blocker == expect_cpu or blocker.startswith(expect_cpu)
    assert q8_head_blocker(cfg, jnp.bfloat16, None, q8).startswith("the model is bfloat16")
    assert q8_head_blocker(cfg, jnp.float32, None, None) == "the target is not a GGUF file"
    import dataclasses
    assert "untied" in q8_head_blocker(dataclasses.replace(cfg, tie_word_embeddings=False), jnp.float32, None, q8)
    if jax.default_backend() == "cpu":
        assert q8_head_blocker(cfg, jnp.float32, None, f32) == "the GGUF's token_embd.weight is not stored as Q8_0"


@pytest.mark.slow
def test_the_embedded_target_reads_its_q8_blocks_unless_told_not_to():
    from dspark_jax.target import load_target
    if jax.default_backend() != "cpu":
        pytest.skip("the Q8_0 head is the CPU path")
    with_blocks, table_only = load_target(), load_target(q8_head=False)
    assert with_blocks.q8_head and not table_only.q8_head and not table_only.q8_kernel
    from dspark_jax.models.q8_ffi import kernel_available
    assert with_blocks.q8_kernel == kernel_available() == with_blocks.int8_layers
    plain_layers = load_target(q8_kernel=False, int8_layers=False)
    assert not plain_layers.q8_kernel and not plain_layers.int8_layers and plain_layers.q8_head
    if with_blocks.int8_layers:  # every projection of the 18 layers is Q5_0 / Q8_0 / Q4_K / Q6_K in this GGUF
        model = with_blocks.model
        assert all(getattr(getattr(layer, part), f"{name}_int8") is not None for layer in model.layers
                   for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                       ("mlp", ("gate_proj", "up_proj", "down_proj"))) for name in names)
        x = jax.random.normal(jax.random.key(1), (1, 3, with_blocks.config.hidden_size))
        np.testing.assert_allclose(jax.jit(lambda x: model.layers[0].mlp(x))(x),
                                   jax.jit(lambda x: plain_layers.model.layers[0].mlp(x))(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="q8_kernel=True needs the Q8_0 head"):
        load_target(q8_head=False, q8_kernel=True)
    with pytest.raises(ValueError, match="no Q8_0 head for q8_kernel=True: the model is bfloat16"):
        load_target(dtype=jnp.bfloat16, q8_kernel=True)
    with pytest.raises(ValueError, match="no int8 layers: the model is bfloat16"):
        load_target(dtype=jnp.bfloat16, q8_head=False, int8_layers=True)
    h = jax.random.normal(jax.random.key(0), (3, with_blocks.config.hidden_size))
    a, b = jax.jit(lambda h: with_blocks.model.logits(h))(h), jax.jit(lambda h: table_only.model.logits(h))(h)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    assert (a.argmax(-1) == b.argmax(-1)).all()
    with pytest.raises(ValueError, match="no Q8_0 head: the model is bfloat16"):
        load_target(dtype=jnp.bfloat16, q8_head=True)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the Q8_0 head is the CPU path")
def test_decoding_never_materializes_the_float32_table():
    """Inside the decoding loop the blocks' dequantization stays fused into each step's matrix-vector product:
    XLA would otherwise hoist it out of the loop (it is loop-invariant) and every step would read a float32
    table written once per call — twice as slow as the float32 head (BENCHMARKS.md "Session 49")."""
    from dspark_jax.decoding.autoregressive import generate
    from dspark_jax.sampling import SamplingParams
    cfg = tiny_gemma3(vocab_size=4096)
    graphdef, state = nnx.split(q8_model(cfg))
    hlo = generate.lower(graphdef, state, jnp.ones((1, 8), jnp.int32), jnp.asarray([5], jnp.int32),
                         jax.random.split(jax.random.key(0), 1), SamplingParams.create(1), max_new_tokens=6,
                         stop_ids=()).compile().as_text()
    built, fused = [], False  # float32 [V, ...] buffers computed outside a fusion (a fusion's insides are not buffers)
    for line in hlo.splitlines():
        if re.match(r"^(ENTRY )?%\S+ \(", line):
            fused = line.startswith("%fused")
        elif not fused and re.search(rf"= f32\[{cfg.vocab_size},", line):
            op = line.split("=", 1)[1].split()[1].split("(")[0]
            if op not in ("parameter", "get-tuple-element", "tuple", "bitcast"):  # the table itself, passed along
                built.append(line.strip()[:120])
    assert not built, f"a float32 copy of the embedding table is built: {built}"

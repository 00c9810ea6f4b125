"""Eagle3 TTT training (spec §2.9): the forward against an explicit float64 loop, its agreement with
`Eagle3Drafter.propose` (training sees exactly what inference computes), its mask, and end-to-end training
with the Trainer (loss falls, the exported drafter decodes losslessly)."""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.testing.tiny_configs import tiny_gemma3, tiny_qwen3
from dspark_jax.sampling import FilterMode, SamplingParams
from dspark_jax.drafters.config import make_drafter_config
from dspark_jax.drafters.eagle3 import Eagle3Drafter
from dspark_jax.models.transformer import Transformer
from dspark_jax.training.eagle3_forward import eagle3_ttt_outputs, ttt_query_rows
from dspark_jax.training.forward import TrainBatch
from dspark_jax.training.trainer import TrainConfig, Trainer

from tests import drafter_reference as ref
from tests.drafters.test_drafter_parity import _randomize
from tests.training.test_trainer import assert_decodes_like_plain, cache, target  # noqa: F401  (fixtures: tiny target + real cache)

TARGETS = {
    # Gemma 3 with linear RoPE scaling, query_pre_attn_scalar != head_dim and a logit soft-cap
    "gemma3x": (lambda: dataclasses.replace(tiny_gemma3(), rope_scaling_factor=4.0, query_pre_attn_scalar=12.0,
                                            final_logit_softcapping=4.0), (0, 1, 2)),
    "qwen3": (lambda: tiny_qwen3(num_layers=3), (0, 1)),
}
N_DRAFT = 40


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


@functools.lru_cache(maxsize=None)
def _setup(name: str, vocab: str):
    make_cfg, taps = TARGETS[name]
    cfg = make_cfg()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    _randomize(model, 1, cfg.family == "gemma3")
    draft_ids = None
    if vocab == "reduced":
        draft_ids = np.sort(np.random.default_rng(7).choice(cfg.vocab_size, N_DRAFT, replace=False)).astype(np.int32)
    dcfg = make_drafter_config("eagle3", cfg, block_size=4, target_layer_ids=taps,
                               draft_vocab_size=None if draft_ids is None else N_DRAFT)
    drafter = Eagle3Drafter(dcfg, cfg, rngs=nnx.Rngs(3), draft_vocab_ids=draft_ids)
    _randomize(drafter, 3, cfg.family == "gemma3")
    return cfg, model, drafter, draft_ids


def _random_batch(cfg, feat_dim: int, lengths, seed: int) -> TrainBatch:
    """Random features/last hidden states, the matching full-vocabulary lse, zero padding past each length."""
    rng = np.random.default_rng(seed)
    b, t = len(lengths), max(max(lengths), 1)
    real = np.arange(t)[None] < np.asarray(lengths)[:, None]
    tokens = np.where(real, rng.integers(0, cfg.vocab_size, (b, t)), 0)
    loss_mask = np.where(real, rng.random((b, t)) < 0.75, 0)
    feats = np.where(real[..., None], rng.normal(size=(b, t, feat_dim)), 0.0)
    last = np.where(real[..., None], rng.normal(size=(b, t, cfg.hidden_size)), 0.0)
    return TrainBatch(tokens=jnp.asarray(tokens, jnp.int32), loss_mask=jnp.asarray(loss_mask, jnp.int32),
                      features=jnp.asarray(feats, jnp.float32), last_hidden=jnp.asarray(last, jnp.float32),
                      target_lse=jnp.zeros((b, t), jnp.float32), lengths=jnp.asarray(lengths, jnp.int32))


def _with_lse(batch: TrainBatch, tp: dict, cap) -> TrainBatch:
    full = ref.softcap(np.asarray(batch.last_hidden, np.float64) @ ref.target_head_rows(tp).T, cap)
    m = full.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(full - m).sum(-1, keepdims=True)))[..., 0]
    return dataclasses.replace(batch, target_lse=jnp.asarray(lse, jnp.float32))


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _ttt(d_graph, t_graph, d_state, t_state, s, batch, queries=None):
    return eagle3_ttt_outputs(nnx.merge(d_graph, d_state), nnx.merge(t_graph, t_state), batch, s, queries)


def _run(drafter, model, batch, s, queries=None):
    d_graph, d_state = nnx.split(drafter)
    t_graph, t_state = nnx.split(model)
    return jax.tree.map(np.asarray, _ttt(d_graph, t_graph, d_state, t_state, s, batch, queries))


# ---- float64 reference: every step's attention written out key by key ---------------------------------------

def reference_ttt(p, dims, tp, feats, tokens, loss_mask, length, last_hidden, lse, steps, draft_ids):
    """One sequence. Returns (log-probs [S, T, N], target probs [S, T, N], mask [S, T]); log-probs of queries
    that see no key at all (only possible at step 0 with length 0) are NaN."""
    t = len(tokens)
    emb = ref.target_embedding(tp)
    head = ref.target_head_rows(tp, draft_ids)
    at = p["self_attn"]
    nh, nkv, hd = dims.heads, dims.kv_heads, dims.head_dim
    tok_ext = list(tokens) + [0] * (steps + 2)
    lm_ext = list(loss_mask) + [0] * (steps + 2)
    hid = np.asarray(feats, np.float64) @ p["fc"]
    chunks = []  # (k [T, KVH, D], v [T, KVH, D]) of steps 0..k
    logps, qs, masks = [], [], []
    for k in range(steps):
        toks = np.array(tok_ext[k + 1:k + 1 + t])
        e = emb[toks] * dims.embed_scale
        xin = np.concatenate([ref.rms_norm(e, p["input_layernorm"]["weight"], dims.eps, dims.gemma),
                              ref.rms_norm(hid, p["hidden_norm"]["weight"], dims.eps, dims.gemma)], axis=-1)
        pos = np.arange(t) + k
        norm = lambda x, w: ref.rms_norm(x, w["weight"], dims.eps, dims.gemma)  # noqa: E731
        q = ref.rope(norm(ref._heads(xin @ at["q_proj"], nh, hd), at["q_norm"]), pos, dims.rope_theta,
                     dims.rope_scaling)
        kk = ref.rope(norm(ref._heads(xin @ at["k_proj"], nkv, hd), at["k_norm"]), pos, dims.rope_theta,
                      dims.rope_scaling)
        chunks.append((kk, ref._heads(xin @ at["v_proj"], nkv, hd)))
        o = np.full((t, nh, hd), np.nan)
        for i in range(t):
            keys = [chunks[0][0][j] for j in range(t) if j <= i and j < length]
            vals = [chunks[0][1][j] for j in range(t) if j <= i and j < length]
            keys += [chunks[c][0][i] for c in range(1, k + 1)]   # the diagonal of chunks 1..k
            vals += [chunks[c][1][i] for c in range(1, k + 1)]
            if keys:
                o[i] = ref.gqa_attention(q[i:i + 1], np.stack(keys), np.stack(vals), dims.attn_scale)[0]
        x = hid + o.reshape(t, -1) @ at["o_proj"]
        hid = x + ref.mlp(p["mlp"], norm(x, p["post_attention_layernorm"]), dims.gemma)
        logits = ref.softcap(norm(hid, p["norm"]) @ head.T, dims.softcap)
        m = logits.max(-1, keepdims=True)
        logps.append(logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True)))
        rows = np.minimum(np.arange(t) + k + 1, t - 1)
        tl = ref.softcap(np.asarray(last_hidden, np.float64)[rows] @ head.T, dims.softcap)
        qs.append(np.exp(tl - np.asarray(lse, np.float64)[rows][:, None]))
        masks.append(np.array([i + k + 2 < length and bool(lm_ext[i + k + 2]) and bool(lm_ext[i + k + 1])
                               for i in range(t)]))
    return np.stack(logps), np.stack(qs), np.stack(masks)


@pytest.mark.parametrize("name,vocab", [("gemma3x", "full"), ("qwen3", "reduced")])
def test_ttt_outputs_match_float64_reference(name, vocab):
    cfg, model, drafter, draft_ids = _setup(name, vocab)
    s, lengths = 3, (6, 4, 0)  # a full row, a padded row and an empty filler row
    batch = _with_lse(_random_batch(cfg, drafter.fc.shape[0], lengths, seed=5), ref.params_of(model),
                      cfg.final_logit_softcapping)
    logp, q, mask = _run(drafter, model, batch, s)
    n = cfg.vocab_size if draft_ids is None else N_DRAFT
    assert logp.shape == q.shape == (s, 3, 6, n) and mask.shape == (s, 3, 6) and mask.dtype == bool
    assert np.isfinite(logp).all() and np.isfinite(q).all()
    p, tp, dims = ref.params_of(drafter), ref.params_of(model), ref.Dims.from_target(cfg)
    for b, length in enumerate(lengths):
        rl, rq, rm = reference_ttt(p, dims, tp, np.asarray(batch.features[b]), np.asarray(batch.tokens[b]),
                                   np.asarray(batch.loss_mask[b]), length, np.asarray(batch.last_hidden[b]),
                                   np.asarray(batch.target_lse[b]), s, draft_ids)
        np.testing.assert_array_equal(mask[:, b], rm, err_msg=f"row {b}")
        seen = np.isfinite(rl[..., 0])  # every query that sees a key (all but step 0 of the empty row)
        assert seen[:, :length].all()
        np.testing.assert_allclose(logp[:, b][seen], rl[seen], atol=2e-4, rtol=1e-4, err_msg=f"row {b}")
        np.testing.assert_allclose(q[:, b][:, :length], rq[:, :length], atol=1e-5, rtol=1e-4, err_msg=f"row {b}")
    # real rows of a full vocabulary: the target probabilities are distributions
    if draft_ids is None:
        np.testing.assert_allclose(q[:, 0].sum(-1), 1.0, rtol=1e-5)


def test_ttt_step_reads_only_its_own_context():
    """Query i at step k depends on features 0..i and tokens 1..i+k+1 only (nothing later, no padding)."""
    cfg, model, drafter, _ = _setup("qwen3", "full")
    s, i0 = 3, 3
    batch = _random_batch(cfg, drafter.fc.shape[0], (8, 8), seed=2)
    rng = np.random.default_rng(0)
    feats = np.asarray(batch.features).copy()
    feats[:, i0 + 1:] = 10 * rng.normal(size=feats[:, i0 + 1:].shape)
    tokens = np.asarray(batch.tokens).copy()
    tokens[:, i0 + s + 1:] = rng.integers(0, cfg.vocab_size, tokens[:, i0 + s + 1:].shape)  # reads up to i0 + s
    other = dataclasses.replace(batch, features=jnp.asarray(feats), tokens=jnp.asarray(tokens),
                                lengths=jnp.asarray([8, i0 + 1], jnp.int32))
    a, b = _run(drafter, model, batch, s)[0], _run(drafter, model, other, s)[0]
    for k in range(s):
        np.testing.assert_allclose(a[k, :, :i0 + 1], b[k, :, :i0 + 1], atol=1e-5, err_msg=f"step {k}")
        assert not np.allclose(a[k, :, i0 + 1:], b[k, :, i0 + 1:], atol=1e-3)


@pytest.mark.parametrize("name,vocab", [("gemma3x", "reduced"), ("qwen3", "full")])
def test_sampled_queries_equal_the_every_row_outputs_at_their_rows(name, vocab):
    """`ttt_query_rows` + `queries`: each sampled draft start gets exactly its every-row TTT outputs (log-probs,
    target probabilities, mask), invalid slots are masked, and the rows are draft starts DSpark would sample
    (query i = anchor - 1: x_{i+1} and x_{i+2} supervised)."""
    cfg, model, drafter, _ = _setup(name, vocab)
    s, lengths = 3, (12, 9, 3)
    batch = _with_lse(_random_batch(cfg, drafter.fc.shape[0], lengths, seed=8), ref.params_of(model),
                      cfg.final_logit_softcapping)
    lm = np.zeros((3, 12), np.int32)
    lm[0, 2:] = 1                       # 9 candidate anchors (2..10)
    lm[1, 1:9] = 1
    lm[1, 5] = 0                        # exactly 5 (1, 2, 3, 6, 7)
    lm[2, 2] = 1                        # none: no two supervised tokens in a row
    batch = dataclasses.replace(batch, loss_mask=jnp.asarray(lm))
    full = _run(drafter, model, batch, s)
    rows, valid = ttt_query_rows(jax.random.key(3), batch.loss_mask, 5)
    part = _run(drafter, model, batch, s, (rows, valid))
    rows, valid, lm = np.asarray(rows), np.asarray(valid), np.asarray(batch.loss_mask)
    assert rows.shape == valid.shape == (3, 5) and part[0].shape[:3] == (s, 3, 5)
    assert valid[0].all() and valid[1].all() and not valid[2].any()
    assert sorted(rows[1].tolist()) == [0, 1, 2, 5, 6]
    for b in range(3):
        for a in range(5):
            if not valid[b, a]:
                assert not part[2][:, b, a].any()
                continue
            i = rows[b, a]
            assert lm[b, i + 1] and lm[b, i + 2] and i + 2 < lengths[b]
            np.testing.assert_allclose(part[0][:, b, a], full[0][:, b, i], atol=1e-5, err_msg=f"{b}, {a}")
            np.testing.assert_allclose(part[1][:, b, a], full[1][:, b, i], atol=1e-6, err_msg=f"{b}, {a}")
            np.testing.assert_array_equal(part[2][:, b, a], full[2][:, b, i])
    assert len(set(rows[0].tolist())) == 5  # drawn without replacement
    with pytest.raises(ValueError, match="ttt_queries"):
        TrainConfig(algorithm="dspark", ttt_queries=8)  # only Eagle3 has TTT queries


def test_ttt_mask():
    cfg, model, drafter, _ = _setup("qwen3", "full")
    batch = _random_batch(cfg, drafter.fc.shape[0], (7, 5, 0), seed=1)
    lm = np.array([[0, 0, 1, 1, 1, 0, 1], [0, 1, 1, 1, 1, 0, 0], [0] * 7])
    batch = dataclasses.replace(batch, loss_mask=jnp.asarray(lm, jnp.int32))
    _, _, mask = _run(drafter, model, batch, 3)
    # query i at step k predicts token i + k + 2 (inside the sequence) from target row i + k + 1: both supervised
    expected = np.array([
        [[0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]],   # step 0
        [[1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]],   # step 1
        [[1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]],   # step 2
    ], bool)
    np.testing.assert_array_equal(mask, expected)
    # the length bounds the mask even where loss_mask is set past it; without lengths every row is full length
    lm[1, 5] = 1
    batch = dataclasses.replace(batch, loss_mask=jnp.asarray(lm, jnp.int32))
    np.testing.assert_array_equal(_run(drafter, model, batch, 3)[2], expected)
    expected[0, 1, 3] = expected[1, 1, 2] = expected[2, 1, 1] = True   # token 5 now counts for row 1
    np.testing.assert_array_equal(_run(drafter, model, dataclasses.replace(batch, lengths=None), 3)[2], expected)


# ---- training sees what inference computes --------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill_propose(d_graph, t_graph, d_state, t_state, feats, tokens, start, key):
    drafter, model = nnx.merge(d_graph, d_state), nnx.merge(t_graph, t_state)
    b, t = tokens.shape
    state = drafter.prefill(model, drafter.init_state(b, t + drafter.config.block_size + 1), feats, tokens, start)
    anchor = jnp.take_along_axis(tokens, start[:, None], axis=1)[:, 0]
    return drafter.propose(model, state, anchor, start, key, SamplingParams.create(b, 1.0), FilterMode(),
                           drafter.head_matrix(model))


@pytest.mark.parametrize("name,vocab", [("gemma3x", "reduced"), ("qwen3", "full")])
def test_ttt_steps_equal_propose_with_the_drafted_tokens(name, vocab):
    """Draft from anchor position a with `propose` (sampling at T = 1), write the drafted tokens into the
    sequence after the anchor, and the TTT forward at query a - 1 must give propose's distribution at every
    step (step k feeds the token propose drew at step k - 1)."""
    cfg, model, drafter, draft_ids = _setup(name, vocab)
    g, t = drafter.config.block_size, 10
    batch = _random_batch(cfg, drafter.fc.shape[0], (t, t), seed=4)
    d_graph, d_state = nnx.split(drafter)
    t_graph, t_state = nnx.split(model)
    for r, starts in enumerate([(1, 6), (4, 2)]):
        start = jnp.asarray(starts, jnp.int32)
        prop = _prefill_propose(d_graph, t_graph, d_state, t_state, batch.features, batch.tokens, start,
                                jax.random.key(r))
        tokens = np.asarray(batch.tokens).copy()
        for b, a in enumerate(starts):
            tokens[b, a + 1:a + g] = np.asarray(prop.tokens[b, :g - 1])
        logp, _, _ = _run(drafter, model, dataclasses.replace(batch, tokens=jnp.asarray(tokens)), g)
        for b, a in enumerate(starts):
            np.testing.assert_allclose(np.exp(logp[:, b, a - 1]), np.asarray(prop.p_draft[b]), atol=2e-5,
                                       err_msg=f"anchor {a}, row {b}")


# ---- end to end -------------------------------------------------------------------------------------------------

CFG = TrainConfig(algorithm="eagle3", gamma=4, num_layers=1, markov_rank=0, draft_vocab_size=None,
                  target_layer_ids=(0, 2), learning_rate=3e-3, warmup_fraction=0.1, epochs=6, batch_size=4,
                  max_len=32, seed=0, log_every=1, checkpoint_every=100, keep_checkpoints=1, ttt_length=3)


@pytest.mark.parametrize("ttt_queries", [0, 6], ids=["every_row", "sampled_starts"])
def test_eagle3_training_loss_falls_and_exported_drafter_is_lossless(target, cache, tmp_path,  # noqa: F811
                                                                     ttt_queries):
    from dspark_jax.drafters.checkpoint import save_drafter
    from dspark_jax.drafters.factory import load_drafter
    before = [np.asarray(x) for x in jax.tree.leaves(target.state)]
    trained = Trainer(target, cache, dataclasses.replace(CFG, ttt_queries=ttt_queries), tmp_path).run(progress=False)
    assert trained.config.algorithm == "eagle3"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows[0]["loss_per_step"]) == CFG.ttt_length and len(rows[0]["accuracy_per_step"]) == CFG.ttt_length
    # the tiny target's distributions are nearly uniform: the soft-CE sits just above their entropy, so the
    # part training can remove is the KL (loss - entropy floor)
    assert all(r["loss"] > r["kl"] >= -1e-5 for r in rows)
    first, last = np.mean([r["kl"] for r in rows[:3]]), np.mean([r["kl"] for r in rows[-3:]])
    assert last < 0.5 * first, (first, last)
    per_start = [r["loss_per_step"][0] / r["num_valid_per_step"][0] for r in rows]  # sampled starts: the loss
    assert np.mean(per_start[-3:]) < np.mean(per_start[:3])                           # sums a varying count
    assert np.mean([r["accuracy_per_step"][0] for r in rows[-3:]]) > np.mean(
        [r["accuracy_per_step"][0] for r in rows[:3]])
    for a, b in zip(before, jax.tree.leaves(target.state)):
        np.testing.assert_array_equal(a, np.asarray(b))

    save_drafter(nnx.merge(trained.graphdef, trained.state), tmp_path / "drafter")
    drafter = load_drafter(str(tmp_path / "drafter"), target)
    assert drafter.config.algorithm == "eagle3"
    sp = assert_decodes_like_plain(target, drafter)
    assert int(np.asarray(sp.accepted).sum()) > 0  # the trained drafter gets drafts accepted

"""Parity of the JAX drafters with the independent float64 NumPy reference (tests/drafter_reference.py).

The drafter context is built the way the speculative loop builds it: `prefill` over right-padded prompts
(rows past a request's prompt length hold garbage), then several `commit`s of G+1 verified rows at per-request
`start` offsets of which only the first `count` are valid (the rest are garbage, later overwritten or masked).
The KV cache starts out filled with garbage too. The reference instead recomputes every block from scratch
from the true features of positions strictly before the anchor.

All float parameters (norm scales and biases included) are re-drawn at O(1) scale: the HF-like init (norms at
0/1, zero biases, 0.02-std weights) would hide wrong norm conventions and make the Markov bias negligible.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.testing.tiny_configs import tiny_gemma3, tiny_qwen3
from dspark_jax.sampling import FilterMode, SamplingParams
from dspark_jax.drafters.config import make_drafter_config
from dspark_jax.drafters.dspark import DSparkDrafter
from dspark_jax.drafters.eagle3 import Eagle3Drafter, Eagle3State
from dspark_jax.models.kv_cache import KVCache
from dspark_jax.models.transformer import Transformer

from tests import drafter_reference as ref

B = 2                           # requests per batch
G = 4                           # block size
PROMPT_LENS = (6, 9)            # right-padded to 9: request 0 has 3 garbage prefill rows
COUNTS = ((2, 5), (5, 1), (3, 4))  # committed rows per round (<= G + 1), different per request
MAX_LEN = 40
N_DRAFT = 40                    # reduced draft vocabulary size (target vocab 97)

TARGETS = {
    "gemma3": lambda: tiny_gemma3(),
    # Gemma 3 with linear RoPE scaling on global layers, a query_pre_attn_scalar != head_dim and a soft-cap
    "gemma3x": lambda: dataclasses.replace(tiny_gemma3(), rope_scaling_factor=4.0, query_pre_attn_scalar=12.0,
                                           final_logit_softcapping=4.0),
    "qwen3": lambda: tiny_qwen3(num_layers=3),            # untied head
    "qwen3tied": lambda: tiny_qwen3(num_layers=3, tie=True),
}
TAPS = {"gemma3": (-1, 1, 2), "gemma3x": (-1, 1, 2), "qwen3": (-1, 0, 1), "qwen3tied": (0,)}
EAGLE3_TAPS = {"gemma3x": (0, 1, 2), "qwen3": (0, 1)}  # Eagle3 cannot tap the embedding output


# ---- setup helpers ------------------------------------------------------------------------------------

def _randomize(module, seed: int, gemma: bool) -> None:
    """Re-draws every float Param at O(1) scale (norm scales around 1 either way)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    pure = nnx.to_pure_dict(state)

    def draw(path, x):
        name = path[-1].key
        x = np.asarray(x)
        if name == "weight":  # RMSNorm scale: Gemma stores w (scale 1 + w), Qwen the scale itself
            v = rng.normal(0, 0.4, x.shape) + (0.0 if gemma else 1.0)
        elif name == "w1":  # Markov embedding
            v = rng.normal(0, 1.0, x.shape)
        elif x.ndim == 2 or name == "w":
            v = rng.normal(0, 1.0 / np.sqrt(x.shape[0]), x.shape)
        else:  # biases
            v = rng.normal(0, 0.5, x.shape)
        return jnp.asarray(v, x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, pure))
    nnx.update(module, state)


@functools.lru_cache(maxsize=None)
def _target(name: str):
    cfg = TARGETS[name]()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    _randomize(model, 1, cfg.family == "gemma3")
    return cfg, model


def _draft_ids(vocab: str, v: int):
    if vocab == "full":
        return None
    return np.sort(np.random.default_rng(7).choice(v, N_DRAFT, replace=False)).astype(np.int32)


def _starts():
    """Anchor positions per checkpoint (after prefill, after each commit): [C, B]."""
    out = [np.array(PROMPT_LENS)]
    for c in COUNTS:
        out.append(out[-1] + np.array(c))
    return np.stack(out)


def _scenario(cfg, feat_dim: int, draft_ids, seed: int):
    """True features/tokens per position, garbage, and anchors (inside / outside a reduced draft vocab)."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(B, MAX_LEN, feat_dim))
    tokens = rng.integers(0, cfg.vocab_size, size=(B, MAX_LEN))
    if draft_ids is not None:  # alternate anchors inside / outside the draft vocabulary
        outside = np.setdiff1d(np.arange(cfg.vocab_size), draft_ids)
        for c, starts in enumerate(_starts()):
            for b in range(B):
                pool = outside if (b + c) % 2 == 0 else draft_ids
                tokens[b, starts[b]] = rng.choice(pool)
    return feats, tokens, rng


# Jitted entry points: one compile per drafter structure (eager dispatch would compile op by op). The tiny
# programs run in microseconds, so spend less time optimising them (keeps the file well under a minute).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, static_argnums=(0, 1, 2), compiler_options=_FAST_COMPILE)
def _jit_call(method: str, d_graph, t_graph, d_state, t_state, *args):
    drafter, target = nnx.merge(d_graph, d_state), nnx.merge(t_graph, t_state)
    if method == "propose":
        state, anchor, start, key, params = args
        return drafter.propose(target, state, anchor, start, key, params, FilterMode(), drafter.head_matrix(target))
    return getattr(drafter, method)(target, *args)


def _call(method: str, drafter, target, *args):
    d_graph, d_state = nnx.split(drafter)
    t_graph, t_state = nnx.split(target)
    return _jit_call(method, d_graph, t_graph, d_state, t_state, *args)


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """Full float32 matmuls even where the backend would default to TF32 / bf16 passes."""
    with jax.default_matmul_precision("highest"):
        yield


def _context_rounds(drafter, target, state, feats, tokens, rng):
    """Drives prefill + commits like speculative.py; returns [(state, start)] after each of them."""
    p, v = max(PROMPT_LENS), target.config.vocab_size
    lens = np.array(PROMPT_LENS)
    pre = np.where(np.arange(p)[None, :, None] < lens[:, None, None], feats[:, :p],
                   3 * rng.normal(size=feats[:, :p].shape))
    prompts = np.where(np.arange(p)[None] < lens[:, None], tokens[:, :p], rng.integers(0, v, (B, p)))
    state = _call("prefill", drafter, target, state, jnp.asarray(pre, jnp.float32),
                  jnp.asarray(prompts, jnp.int32), jnp.asarray(lens, jnp.int32))
    start = lens.copy()
    out = [(state, start.copy())]
    rows = np.arange(G + 1)
    for counts in COUNTS:
        count = np.array(counts)
        pos = start[:, None] + rows[None]
        valid = rows[None] < count[:, None]
        f = np.where(valid[..., None], np.take_along_axis(feats, pos[..., None], axis=1),
                     3 * rng.normal(size=(B, G + 1, feats.shape[-1])))
        verified = np.where(valid, np.take_along_axis(tokens, pos, axis=1), rng.integers(0, v, (B, G + 1)))
        state = _call("commit", drafter, target, state, jnp.asarray(f, jnp.float32),
                      jnp.asarray(verified, jnp.int32), jnp.asarray(start, jnp.int32), jnp.asarray(count, jnp.int32))
        start = start + count
        out.append((state, start.copy()))
    return out


def _garbage_cache(shape_src: KVCache, rng) -> KVCache:
    g = lambda a: jnp.asarray(5 * rng.normal(size=a.shape), a.dtype)  # noqa: E731
    return KVCache(tuple(g(a) for a in shape_src.k), tuple(g(a) for a in shape_src.v))


def _dspark(target_name: str, kind: str, vocab: str, seed: int = 11):
    cfg, target = _target(target_name)
    draft_ids = _draft_ids(vocab, cfg.vocab_size)
    algo = "dflash" if kind == "dflash" else "dspark"
    dcfg = make_drafter_config(algo, cfg, block_size=G, num_layers=2, markov_rank=0 if kind == "confonly" else 8,
                               markov_head_type=kind if kind in ("vanilla", "gated", "rnn") else "vanilla",
                               target_layer_ids=TAPS[target_name],
                               draft_vocab_size=None if draft_ids is None else N_DRAFT)
    drafter = DSparkDrafter(dcfg, cfg, rngs=nnx.Rngs(seed), draft_vocab_ids=draft_ids)
    _randomize(drafter, seed, cfg.family == "gemma3")
    if drafter.confidence is not None:
        drafter.confidence.temperatures[...] = jnp.asarray(np.random.default_rng(seed).uniform(0.5, 2.0, G),
                                                           jnp.float32)
        drafter.confidence.biases[...] = jnp.asarray(np.random.default_rng(seed + 1).uniform(-1.0, 1.0, G),
                                                     jnp.float32)
    return cfg, target, dcfg, drafter, draft_ids


def _close(actual, desired, tol=1e-4, what=""):
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    scale = max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol * scale, err_msg=what)


def _clear_argmax(logits, margin=1e-3):
    top = np.sort(logits, axis=-1)[..., -2:]
    assert (top[..., 1] - top[..., 0] > margin).all(), "reference near-tie: test setup should change seed"


# ---- DSpark / DFlash backbone ---------------------------------------------------------------------------

@pytest.mark.parametrize("target_name", list(TARGETS))
def test_backbone_after_incremental_context_matches_reference(target_name):
    cfg, target, dcfg, drafter, _ = _dspark(target_name, "vanilla", "full")
    dims = ref.Dims.from_target(cfg)
    p, tp = ref.params_of(drafter), ref.params_of(target)
    feats, tokens, rng = _scenario(cfg, len(dcfg.target_layer_ids) * cfg.hidden_size, None, seed=3)
    state0 = _garbage_cache(drafter.init_state(B, MAX_LEN), rng)
    sub_ids = _draft_ids("reduced", cfg.vocab_size)
    head_full, head_sub = drafter.head_matrix(target), jnp.take(drafter.head_matrix(target), sub_ids, axis=0)
    for ci, (state, start) in enumerate(_context_rounds(drafter, target, state0, feats, tokens, rng)):
        anchor = tokens[np.arange(B), start]
        hidden = _call("backbone", drafter, target, jnp.asarray(anchor, jnp.int32), jnp.asarray(start, jnp.int32),
                       state)
        u_full, u_sub = drafter.base_logits(hidden, head_full), drafter.base_logits(hidden, head_sub)
        for b in range(B):
            h_ref = ref.dspark_hidden(p, dims, tp, feats[b, :start[b]], anchor[b], dcfg.mask_token_id, G)
            _close(hidden[b], h_ref, what=f"H, checkpoint {ci}, request {b} (anchor at {start[b]})")
            _close(u_full[b], ref.base_logits(h_ref, ref.target_head_rows(tp), dims.softcap), what="U full")
            _close(u_sub[b], ref.base_logits(h_ref, ref.target_head_rows(tp, sub_ids), dims.softcap),
                   what="U reduced")


def test_reference_context_matters():
    """Sanity of the reference itself: excluding a context position or including the anchor's feature
    changes H (so the parity test above actually pins the context window)."""
    cfg, target, dcfg, drafter, _ = _dspark("qwen3", "vanilla", "full")
    dims, p, tp = ref.Dims.from_target(cfg), ref.params_of(drafter), ref.params_of(target)
    feats = np.random.default_rng(0).normal(size=(12, len(dcfg.target_layer_ids) * cfg.hidden_size))
    h = ref.dspark_hidden(p, dims, tp, feats[:10], 5, dcfg.mask_token_id, G)
    assert np.abs(h - ref.dspark_hidden(p, dims, tp, feats[:9], 5, dcfg.mask_token_id, G)).max() > 1e-3
    assert np.abs(h - ref.dspark_hidden(p, dims, tp, feats[:11], 5, dcfg.mask_token_id, G)).max() > 1e-3


# ---- DSpark / DFlash proposal -------------------------------------------------------------------------------

PROPOSE_CASES = ([(t, k, v) for t in ("gemma3x", "qwen3") for k in ("vanilla", "gated", "rnn")
                  for v in ("full", "reduced")]
                 + [("gemma3x", "dflash", "full"), ("qwen3", "dflash", "reduced"), ("qwen3", "confonly", "reduced")])


@pytest.mark.parametrize("target_name,kind,vocab", PROPOSE_CASES)
def test_propose_matches_reference(target_name, kind, vocab):
    """kind: a Markov head type; "dflash" (no heads); "confonly" (DSpark with markov_rank 0: confidence on h)."""
    cfg, target, dcfg, drafter, draft_ids = _dspark(target_name, kind, vocab)
    dims, p, tp = ref.Dims.from_target(cfg), ref.params_of(drafter), ref.params_of(target)
    markov = None if kind in ("dflash", "confonly") else kind
    has_conf = drafter.confidence is not None
    temps = np.asarray(drafter.confidence.temperatures[...]) if has_conf else None
    biases = np.asarray(drafter.confidence.biases[...]) if has_conf else None
    feats, tokens, rng = _scenario(cfg, len(dcfg.target_layer_ids) * cfg.hidden_size, draft_ids, seed=5)
    state0 = _garbage_cache(drafter.init_state(B, MAX_LEN), rng)
    head_ref = ref.target_head_rows(tp, draft_ids)
    d2t = np.arange(cfg.vocab_size) if draft_ids is None else draft_ids
    rounds = _context_rounds(drafter, target, state0, feats, tokens, rng)
    for ci in (0, len(rounds) - 1):
        state, start = rounds[ci]
        anchor = tokens[np.arange(B), start]
        args = (state, jnp.asarray(anchor, jnp.int32), jnp.asarray(start, jnp.int32), jax.random.key(ci))
        greedy = _call("propose", drafter, target, *args, SamplingParams.create(B))
        warm = _call("propose", drafter, target, *args, SamplingParams.create(B, 0.8))
        for b in range(B):
            where = f"checkpoint {ci}, request {b}"
            h = ref.dspark_hidden(p, dims, tp, feats[b, :start[b]], anchor[b], dcfg.mask_token_id, G)
            u = ref.base_logits(h, head_ref, dims.softcap)
            # greedy: tokens, one-hot p_draft, confidence
            idx, logits, conf = ref.greedy_block(p, markov, u, h, anchor[b], draft_ids, has_conf)
            _clear_argmax(logits)
            np.testing.assert_array_equal(np.asarray(greedy.draft_index[b]), idx, err_msg=where)
            np.testing.assert_array_equal(np.asarray(greedy.tokens[b]), d2t[idx], err_msg=where)
            np.testing.assert_array_equal(np.asarray(greedy.p_draft[b]), np.eye(len(head_ref))[idx], err_msg=where)
            _close(greedy.confidence_logits[b], conf, what=f"confidence logits, {where}")
            _close(greedy.confidence[b], ref.sigmoid(conf / temps + biases) if has_conf else np.ones(G), what=where)
            # T = 0.8: p_draft = softmax(corrected logits / T), teacher-forced on the tokens JAX drew
            drawn = np.asarray(warm.draft_index[b])
            np.testing.assert_array_equal(np.asarray(warm.tokens[b]), d2t[drawn], err_msg=where)
            prev = [ref.markov_row(anchor[b], draft_ids)] + drawn[:-1].tolist()
            logits, conf = ref.sequential_logits(p, markov, u, h, prev, has_conf)
            _close(warm.p_draft[b], ref.softmax(logits / 0.8), tol=2e-5, what=f"p_draft at T=0.8, {where}")
            _close(warm.confidence_logits[b], conf, what=f"confidence logits at T=0.8, {where}")


def test_propose_uses_each_request_s_calibration_set():
    """A head with one calibration set per sampling temperature: each request's confidences use the set fitted
    nearest to its own temperature (here T 0.9 -> the set at 1, T 0 -> the set at 0, in one batch)."""
    cfg, target, dcfg, drafter, _ = _dspark("qwen3", "vanilla", "full")
    rng = np.random.default_rng(1)
    temps, biases = rng.uniform(0.5, 2.0, (2, G)), rng.uniform(-1.0, 1.0, (2, G))
    drafter.confidence.temperatures.value = jnp.asarray(temps, jnp.float32)
    drafter.confidence.biases.value = jnp.asarray(biases, jnp.float32)
    drafter.confidence.calibrated_at.value = jnp.asarray([0.0, 1.0], jnp.float32)
    feats, tokens, rng = _scenario(cfg, len(dcfg.target_layer_ids) * cfg.hidden_size, None, seed=5)
    state, start = _context_rounds(drafter, target, _garbage_cache(drafter.init_state(B, MAX_LEN), rng), feats,
                                   tokens, rng)[-1]
    params = SamplingParams(temperature=jnp.array([0.9, 0.0]), top_k=jnp.zeros((B,), jnp.int32),
                            top_p=jnp.ones((B,), jnp.float32))
    prop = _call("propose", drafter, target, state, jnp.asarray(tokens[np.arange(B), start], jnp.int32),
                 jnp.asarray(start, jnp.int32), jax.random.key(0), params)
    for b, s in ((0, 1), (1, 0)):
        z = np.asarray(prop.confidence_logits[b], np.float64)
        _close(prop.confidence[b], ref.sigmoid(z / temps[s] + biases[s]), what=f"request {b}, set {s}")
        assert np.abs(np.asarray(prop.confidence[b]) - ref.sigmoid(z / temps[1 - s] + biases[1 - s])).max() > 1e-3


# ---- Eagle3 ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", ["full", "reduced"])
@pytest.mark.parametrize("target_name", ["gemma3x", "qwen3"])
def test_eagle3_proposal_matches_reference(target_name, vocab):
    cfg, target = _target(target_name)
    draft_ids = _draft_ids(vocab, cfg.vocab_size)
    dcfg = make_drafter_config("eagle3", cfg, block_size=G, target_layer_ids=EAGLE3_TAPS[target_name],
                               draft_vocab_size=None if draft_ids is None else N_DRAFT)
    drafter = Eagle3Drafter(dcfg, cfg, rngs=nnx.Rngs(3), draft_vocab_ids=draft_ids)
    _randomize(drafter, 3, cfg.family == "gemma3")
    dims, p, tp = ref.Dims.from_target(cfg), ref.params_of(drafter), ref.params_of(target)
    feats, tokens, rng = _scenario(cfg, len(dcfg.target_layer_ids) * cfg.hidden_size, draft_ids, seed=9)
    st = drafter.init_state(B, MAX_LEN)
    state0 = Eagle3State(_garbage_cache(st.cache, rng), jnp.asarray(rng.normal(size=st.pending.shape), jnp.float32))
    d2t = np.arange(cfg.vocab_size) if draft_ids is None else draft_ids
    rounds = _context_rounds(drafter, target, state0, feats, tokens, rng)
    for ci in (0, len(rounds) - 1):
        state, start = rounds[ci]
        anchor = tokens[np.arange(B), start]
        args = (state, jnp.asarray(anchor, jnp.int32), jnp.asarray(start, jnp.int32), jax.random.key(ci))
        greedy = _call("propose", drafter, target, *args, SamplingParams.create(B))
        warm = _call("propose", drafter, target, *args, SamplingParams.create(B, 0.8))
        for b in range(B):
            where = f"checkpoint {ci}, request {b}"
            n = start[b]
            idx, logits = ref.eagle3_block(p, dims, tp, feats[b, :n], tokens[b, 1:n + 1], G, draft_ids)
            _clear_argmax(logits)
            np.testing.assert_array_equal(np.asarray(greedy.draft_index[b]), idx, err_msg=where)
            np.testing.assert_array_equal(np.asarray(greedy.tokens[b]), d2t[idx], err_msg=where)
            np.testing.assert_array_equal(np.asarray(greedy.p_draft[b]), np.eye(len(d2t))[idx], err_msg=where)
            np.testing.assert_array_equal(np.asarray(greedy.confidence[b]), np.ones(G))
            np.testing.assert_array_equal(np.asarray(greedy.confidence_logits[b]), np.zeros(G))
            drawn = np.asarray(warm.draft_index[b])
            np.testing.assert_array_equal(np.asarray(warm.tokens[b]), d2t[drawn], err_msg=where)
            _, logits = ref.eagle3_block(p, dims, tp, feats[b, :n], tokens[b, 1:n + 1], G, draft_ids, forced=drawn)
            _close(warm.p_draft[b], ref.softmax(logits / 0.8), tol=2e-5, what=f"p_draft at T=0.8, {where}")

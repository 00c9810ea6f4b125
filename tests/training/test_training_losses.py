"""Training math: anchor sampling, block construction, DSpark/DFlash and Eagle3 losses.

The losses are checked against independent float64 NumPy references written below (slot by slot, with the
reduced-vocabulary L1 computed over the FULL vocabulary), plus hand-computed small cases.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dspark_jax.training.anchors import Blocks, build_blocks, sample_anchors
from dspark_jax.training.losses import (SlotTerms, dspark_loss, dspark_reduce, dspark_slot_terms,
                                        eagle3_ttt_loss, position_weights)


# ---------------------------------------------------------------------------------------------------------
# NumPy float64 references
# ---------------------------------------------------------------------------------------------------------

def _np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_dspark(draft, target_full, draft_ids, labels_full, conf, mask, alpha=(0.1, 0.9, 1.0), decay=4.0):
    """Reference over the FULL target vocabulary: the draft distribution is embedded into V columns.

    draft [B,K,G,N], target_full [B,K,G,V], draft_ids [N] (target ids of the draft columns, or None = all),
    labels_full [B,K,G] target ids, conf [B,K,G] or None, mask [B,K,G] bool.
    """
    draft = np.asarray(draft, np.float64)
    target_full = np.asarray(target_full, np.float64)
    B, K, G, N = draft.shape
    V = target_full.shape[-1]
    ids = np.arange(V) if draft_ids is None else np.asarray(draft_ids)
    w = np.exp(-np.arange(G) / decay)
    num = {"ce": 0.0, "l1": 0.0, "conf": 0.0}
    den = {"ce": 0.0, "l1": 0.0}
    cstar = np.zeros((B, K, G))
    for b, k, g in itertools.product(range(B), range(K), range(G)):
        if not mask[b, k, g]:
            continue
        pd_small = _np_softmax(draft[b, k, g])
        pd = np.zeros(V)
        pd[ids] = pd_small
        pt = _np_softmax(target_full[b, k, g])
        l1 = np.abs(pd - pt).sum()
        c = min(max(1.0 - 0.5 * l1, 0.0), 1.0)
        cstar[b, k, g] = c
        num["l1"] += w[g] * l1
        den["l1"] += w[g]
        lab = int(labels_full[b, k, g])
        if lab in set(ids.tolist()):
            num["ce"] += w[g] * -np.log(pd[lab])
            den["ce"] += w[g]
        if conf is not None:
            z = float(conf[b, k, g])
            num["conf"] += w[g] * -(c * np.log(_np_sigmoid(z)) + (1 - c) * np.log(1 - _np_sigmoid(z)))
    ce = num["ce"] / den["ce"] if den["ce"] else 0.0
    l1 = num["l1"] / den["l1"] if den["l1"] else 0.0
    out = {"ce": ce, "l1": l1, "conf": 0.0}
    loss = alpha[0] * ce + alpha[1] * l1
    if conf is not None:
        out["conf"] = num["conf"] / den["l1"] if den["l1"] else 0.0
        loss += alpha[2] * out["conf"]
    out["loss"] = loss
    out["accept_rate"] = np.array([cstar[..., g][mask[..., g]].mean() if mask[..., g].any() else 0.0
                                   for g in range(G)])
    taus = []
    for b, k in itertools.product(range(B), range(K)):
        if mask[b, k, 0]:
            surv, tau = 1.0, 1.0
            for g in range(G):
                surv *= cstar[b, k, g] if mask[b, k, g] else 0.0
                tau += surv
            taus.append(tau)
    out["tau_probabilistic"] = float(np.mean(taus)) if taus else 0.0
    out["num_valid_slots"] = float(mask.sum())
    out["num_valid_blocks"] = float(mask[..., 0].sum())
    if conf is not None:
        sig = _np_sigmoid(np.asarray(conf, np.float64))
        out["confidence_abs_error"] = np.abs(sig - cstar)[mask].mean()
        out["confidence_bias"] = (sig - cstar)[mask].mean()
        cb = []
        for b, k in itertools.product(range(B), range(K)):
            ps, pc = 1.0, 1.0
            for g in range(G):
                if mask[b, k, g]:
                    ps *= sig[b, k, g]
                    pc *= cstar[b, k, g]
                    cb.append(ps - pc)
        out["confidence_cumprod_bias"] = float(np.mean(cb))
    return out


def np_eagle3(logp, q, masks, decay=0.8):
    logp = np.asarray(logp, np.float64)
    q = np.asarray(q, np.float64)
    S, B, T, N = logp.shape
    losses, accs = [], []
    for s in range(S):
        tot, hit, cnt = 0.0, 0, 0
        for b, t in itertools.product(range(B), range(T)):
            if not masks[s, b, t]:
                continue
            nz = q[s, b, t] > 0
            tot += -(q[s, b, t][nz] * logp[s, b, t][nz]).sum()
            hit += int(np.argmax(logp[s, b, t]) == np.argmax(q[s, b, t]))
            cnt += 1
        losses.append(tot / (B * T))
        accs.append(hit / cnt if cnt else 0.0)
    losses = np.array(losses)
    return (decay ** np.arange(S) * losses).sum(), losses, np.array(accs)


def _prefix_mask(rng, shape):
    """Random eval masks with the block structure: a contiguous prefix per block (some blocks empty)."""
    *lead, G = shape
    lengths = rng.integers(0, G + 1, size=lead)
    return np.arange(G) < lengths[..., None]


def _assert_metrics(got, ref, rtol=2e-5, atol=2e-6):
    for name, val in ref.items():
        np.testing.assert_allclose(np.asarray(got[name], np.float64), val, rtol=rtol, atol=atol, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# dspark_loss
# ---------------------------------------------------------------------------------------------------------

def test_position_weights():
    np.testing.assert_allclose(position_weights(7), [1, .779, .607, .472, .368, .287, .223], atol=6e-4)
    np.testing.assert_allclose(position_weights(3, decay=2.0), np.exp(-np.arange(3) / 2.0), rtol=1e-6)


def test_dspark_loss_full_vocab_matches_numpy():
    rng = np.random.default_rng(0)
    B, K, G, N = 2, 3, 5, 11
    draft = rng.normal(size=(B, K, G, N)) * 2
    target = rng.normal(size=(B, K, G, N)) * 2
    labels = rng.integers(0, N, size=(B, K, G))
    conf = rng.normal(size=(B, K, G)) * 2
    mask = _prefix_mask(rng, (B, K, G))
    mask[0, 0] = True
    loss, metrics = jax.jit(dspark_loss)(jnp.float32(draft), jnp.float32(target), None, jnp.int32(labels),
                                        jnp.float32(conf), jnp.asarray(mask))
    ref = np_dspark(draft, target, None, labels, conf, mask)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=2e-5)
    _assert_metrics(metrics, ref)
    assert metrics["accept_rate"].shape == (G,)


def test_dspark_loss_reduced_vocab_oov_labels_and_mass():
    rng = np.random.default_rng(1)
    B, K, G, V = 2, 4, 4, 13
    draft_ids = np.array([0, 2, 3, 5, 8, 9, 12])
    N = len(draft_ids)
    t2d = np.full(V, -1)
    t2d[draft_ids] = np.arange(N)
    draft = rng.normal(size=(B, K, G, N)) * 2
    target_full = rng.normal(size=(B, K, G, V)) * 2
    target_full[0, 0, 0, 1] = 6.0     # a lot of target mass outside the draft vocabulary
    labels_full = rng.integers(0, V, size=(B, K, G))
    labels_full[0, 0, :2] = [1, 4]    # OOV labels in valid slots
    conf = rng.normal(size=(B, K, G))
    mask = _prefix_mask(rng, (B, K, G))
    mask[0, 0] = True
    labels = t2d[labels_full]
    assert (labels[mask] == -1).any() and (labels[mask] >= 0).any()
    target_lse = np.log(np.exp(target_full).sum(-1))
    args = (jnp.float32(draft), jnp.float32(target_full[..., draft_ids]), jnp.float32(target_lse),
            jnp.int32(labels), jnp.float32(conf), jnp.asarray(mask))
    loss, metrics = jax.jit(dspark_loss)(*args)
    ref = np_dspark(draft, target_full, draft_ids, labels_full, conf, mask)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=2e-5)
    _assert_metrics(metrics, ref)
    # Other alphas / decay.
    loss2, m2 = dspark_loss(*args, alpha=(0.3, 0.2, 0.5), decay=2.0)
    ref2 = np_dspark(draft, target_full, draft_ids, labels_full, conf, mask, alpha=(0.3, 0.2, 0.5), decay=2.0)
    np.testing.assert_allclose(float(loss2), ref2["loss"], rtol=2e-5)
    _assert_metrics(m2, ref2)


def test_dflash_alpha_without_confidence_head():
    rng = np.random.default_rng(2)
    B, K, G, N = 1, 3, 4, 9
    draft, target = rng.normal(size=(2, B, K, G, N))
    labels = rng.integers(0, N, size=(B, K, G))
    mask = _prefix_mask(rng, (B, K, G))
    mask[0, 0] = True
    loss, metrics = dspark_loss(jnp.float32(draft), jnp.float32(target), None, jnp.int32(labels), None,
                                jnp.asarray(mask), alpha=(1.0, 0.0, 0.0))
    ref = np_dspark(draft, target, None, labels, None, mask, alpha=(1.0, 0.0, 0.0))
    np.testing.assert_allclose(float(loss), ref["ce"], rtol=2e-5)
    _assert_metrics(metrics, ref)
    assert float(metrics["conf"]) == 0.0 and "confidence_bias" not in metrics
    # alpha_conf == 0 with a confidence head: reported, not added.
    conf = jnp.float32(rng.normal(size=(B, K, G)))
    loss0, m0 = dspark_loss(jnp.float32(draft), jnp.float32(target), None, jnp.int32(labels), conf,
                            jnp.asarray(mask), alpha=(1.0, 0.0, 0.0))
    np.testing.assert_allclose(float(loss0), float(loss), rtol=1e-6)
    assert float(m0["conf"]) > 0


def test_tau_probabilistic_and_accept_rate_by_hand():
    accept = jnp.float32([[[0.5, 0.8, 0.5], [0.9, 0.6, 0.7], [0.3, 0.3, 0.3]]])     # [1, 3, 3]
    mask = jnp.asarray([[[True, True, True], [True, True, False], [False, False, False]]])
    terms = SlotTerms(ce=jnp.zeros((1, 3, 3)), in_vocab=mask, l1=2 * (1 - accept), accept=accept)
    _, m = dspark_reduce(terms, None, mask)
    # block 0: 1 + .5 + .4 + .2 = 2.1; block 1: 1 + .9 + .54 = 2.44 (slot 2 masked); block 2 invalid.
    np.testing.assert_allclose(float(m["tau_probabilistic"]), (2.1 + 2.44) / 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["accept_rate"]), [0.7, 0.7, 0.5], rtol=1e-6)
    assert float(m["num_valid_slots"]) == 5 and float(m["num_valid_blocks"]) == 2
    w = np.exp(-np.arange(3) / 4.0)
    l1 = (w[0] * 1.0 + w[1] * 0.4 + w[2] * 1.0 + w[0] * 0.2 + w[1] * 0.8) / (2 * w[0] + 2 * w[1] + w[2])
    np.testing.assert_allclose(float(m["l1"]), l1, rtol=1e-6)


def test_garbage_in_masked_slots_and_empty_mask():
    rng = np.random.default_rng(3)
    B, K, G, N = 1, 3, 4, 6
    draft, target = rng.normal(size=(2, B, K, G, N)).astype(np.float32)
    lse = np.log(np.exp(target).sum(-1) + 0.5).astype(np.float32)
    labels = rng.integers(0, N, size=(B, K, G))
    conf = rng.normal(size=(B, K, G)).astype(np.float32)
    mask = np.zeros((B, K, G), bool)
    mask[0, 0, :2] = True
    mask[0, 1, :4] = True

    def loss_fn(d, t, s, c, lab):
        return dspark_loss(d, t, s, lab, c, jnp.asarray(mask))[0]

    clean = (draft, target, lse, conf, labels)
    dirty = [x.copy() for x in clean]
    dirty[0][~mask] = np.nan
    dirty[1][~mask] = np.inf
    dirty[2][~mask] = -np.inf
    dirty[3][~mask] = np.nan
    dirty[4][~mask] = 10 ** 6
    v_clean, g_clean = jax.value_and_grad(loss_fn, argnums=(0, 3))(*map(jnp.asarray, clean))
    v_dirty, g_dirty = jax.value_and_grad(loss_fn, argnums=(0, 3))(*map(jnp.asarray, dirty))
    np.testing.assert_allclose(float(v_dirty), float(v_clean), rtol=1e-6)
    for a, b in zip(g_clean, g_dirty):
        assert np.isfinite(np.asarray(b)).all()
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    # No valid slot: every term is 0, gradients 0, nothing NaN.
    none = jnp.zeros((B, K, G), bool)
    loss, metrics = dspark_loss(*map(jnp.asarray, (dirty[0], dirty[1], dirty[2], dirty[4], dirty[3])), none)
    assert float(loss) == 0.0
    assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())


def test_gradients_finite_and_label_detached():
    rng = np.random.default_rng(4)
    B, K, G, N, V = 2, 2, 3, 5, 8
    draft = jnp.float32(rng.normal(size=(B, K, G, N)))
    full = rng.normal(size=(B, K, G, V))
    target = jnp.float32(full[..., :N])
    lse = jnp.float32(np.log(np.exp(full).sum(-1)))
    labels = jnp.int32(np.where(rng.random((B, K, G)) < 0.3, -1, rng.integers(0, N, (B, K, G))))
    conf = jnp.float32(rng.normal(size=(B, K, G)))
    mask = jnp.asarray(_prefix_mask(rng, (B, K, G)) | (np.arange(G) == 0))

    def f(d, t, s, c, alpha):
        return dspark_loss(d, t, s, labels, c, mask, alpha=alpha)[0]

    g_conf = jax.grad(f, argnums=(0, 1, 2, 3))(draft, target, lse, conf, (0.0, 0.0, 1.0))
    assert not np.asarray(g_conf[0]).any(), "the confidence label must not send gradients to the draft logits"
    assert not np.asarray(g_conf[1]).any() and not np.asarray(g_conf[2]).any()
    # d conf / d z = w·(σ(z) − c*) / Σw on valid slots.
    terms_accept = np.asarray(dspark_slot_terms(draft, target, lse, labels, mask).accept)
    wm = np.exp(-np.arange(G) / 4.0) * np.asarray(mask)
    expect = wm * (1 / (1 + np.exp(-np.asarray(conf))) - terms_accept) / wm.sum()
    np.testing.assert_allclose(np.asarray(g_conf[3]), expect, rtol=1e-5, atol=1e-7)

    g_all = jax.grad(f, argnums=(0, 1, 2, 3))(draft, target, lse, conf, (0.1, 0.9, 1.0))
    for g in g_all:
        assert np.isfinite(np.asarray(g)).all()
    assert np.abs(np.asarray(g_all[0])).sum() > 0
    assert not np.asarray(g_all[1]).any() and not np.asarray(g_all[2]).any(), "the target is frozen"
    # CE+L1 gradient vs central differences of the float64 reference (one coordinate).
    d64 = np.asarray(draft, np.float64)
    full_t = full.copy()
    lab_full = np.where(np.asarray(labels) >= 0, np.asarray(labels), 7)   # id 7 is outside draft ids 0..4
    idx = (1, 0, 0, 2)
    eps = 1e-5
    plus, minus = d64.copy(), d64.copy()
    plus[idx] += eps
    minus[idx] -= eps
    msk = np.asarray(mask)
    # The reference differentiates through c*, so compare only the CE+L1 part (alpha_conf = 0).
    num = (np_dspark(plus, full_t, np.arange(N), lab_full, None, msk, alpha=(0.1, 0.9, 0.0))["loss"]
           - np_dspark(minus, full_t, np.arange(N), lab_full, None, msk, alpha=(0.1, 0.9, 0.0))["loss"]) / (2 * eps)
    g_ce_l1 = jax.grad(f)(draft, target, lse, conf, (0.1, 0.9, 0.0))
    np.testing.assert_allclose(float(g_ce_l1[idx]), num, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# eagle3_ttt_loss
# ---------------------------------------------------------------------------------------------------------

def test_eagle3_ttt_loss_matches_numpy():
    rng = np.random.default_rng(5)
    S, B, T, N = 3, 2, 5, 7
    logits = rng.normal(size=(S, B, T, N)) * 2
    logits[0, 0, 0, 3] = -np.inf                       # impossible draft token where the target has q = 0
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    q = _np_softmax(rng.normal(size=(S, B, T, N)) * 2)
    q[0, 0, 0, 3] = 0.0
    q[0, 0, 0] /= q[0, 0, 0].sum()
    masks = rng.random((S, B, T)) < 0.7
    masks[0, 0, 0] = True
    masks[2] = False                                    # a step with no valid position
    loss, metrics = jax.jit(eagle3_ttt_loss)(jnp.float32(logp), jnp.float32(q), jnp.asarray(masks))
    ref_loss, ref_steps, ref_acc = np_eagle3(logp, q, masks)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(metrics["loss_per_step"]), ref_steps, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(metrics["accuracy_per_step"]), ref_acc, atol=1e-6)
    grad = jax.grad(lambda lp: eagle3_ttt_loss(lp, jnp.float32(q), jnp.asarray(masks), decay=0.5)[0])(
        jnp.float32(logp))
    assert np.isfinite(np.asarray(grad)).all()
    expect = -(0.5 ** np.arange(S))[:, None, None, None] * q * masks[..., None] / (B * T)
    np.testing.assert_allclose(np.asarray(grad), expect, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# Anchors
# ---------------------------------------------------------------------------------------------------------

def _candidates(loss_mask):
    lm = np.asarray(loss_mask, bool)
    return set(np.flatnonzero(lm[:-1] & lm[1:]).tolist())


@pytest.mark.parametrize("K", [4, 9, 30])
def test_sample_anchors_properties(K):
    loss_mask = np.zeros(24, bool)
    loss_mask[3:10] = True
    loss_mask[14:17] = True
    loss_mask[20:24] = True
    cands = _candidates(loss_mask)                      # 6 + 2 + 3 = 11 candidates
    assert len(cands) == 11
    fn = jax.jit(sample_anchors, static_argnums=2)
    for seed in range(5):
        anchors, valid = map(np.asarray, fn(jax.random.key(seed), jnp.asarray(loss_mask), K))
        assert anchors.shape == (K,) and anchors.dtype == np.int32 and valid.dtype == bool
        n = min(K, len(cands))
        assert valid.sum() == n and valid[:n].all()                       # valid prefix, dummies trailing
        chosen = anchors[valid]
        assert len(set(chosen.tolist())) == n                             # without replacement
        assert set(chosen.tolist()) <= cands
        assert (np.diff(chosen) > 0).all()                                # sorted ascending
        assert (anchors[~valid] == 0).all()
        if K >= len(cands):
            assert set(chosen.tolist()) == cands


def test_sample_anchors_no_candidates():
    for lm in (np.zeros(6, bool), np.array([1, 0, 1, 0, 1, 0], bool), np.ones(1, bool)):
        anchors, valid = sample_anchors(jax.random.key(0), jnp.asarray(lm), 3)
        assert not np.asarray(valid).any() and not np.asarray(anchors).any()


def test_sample_anchors_uniform_subsets():
    loss_mask = jnp.asarray([0, 1, 1, 1, 0, 1, 1, 1, 1], bool)     # candidates {1, 2, 5, 6, 7}
    K, n_draws = 2, 5000
    keys = jax.random.split(jax.random.key(123), n_draws)
    anchors, valid = jax.jit(jax.vmap(lambda k: sample_anchors(k, loss_mask, K)))(keys)
    assert np.asarray(valid).all()
    subsets = list(itertools.combinations([1, 2, 5, 6, 7], 2))
    index = {s: i for i, s in enumerate(subsets)}
    counts = np.zeros(len(subsets))
    for row in np.asarray(anchors):
        counts[index[tuple(row.tolist())]] += 1
    p = stats.chisquare(counts).pvalue
    assert p > 1e-3, (counts, p)


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------

TOKENS = 100 + np.arange(12)
#               0  1  2  3  4  5  6  7  8  9 10 11
LOSS_MASK = np.array([0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1], bool)


def test_build_blocks_by_hand():
    anchors = jnp.int32([3, 5, 10, 0])
    valid = jnp.asarray([True, True, True, False])
    blk = jax.jit(build_blocks, static_argnums=(4, 5))(jnp.int32(TOKENS), jnp.asarray(LOSS_MASK), anchors,
                                                          valid, 4, 7)
    assert isinstance(blk, Blocks)
    np.testing.assert_array_equal(blk.input_ids, [[103, 7, 7, 7], [105, 7, 7, 7], [110, 7, 7, 7], [100, 7, 7, 7]])
    np.testing.assert_array_equal(blk.positions, [[3, 4, 5, 6], [5, 6, 7, 8], [10, 11, 12, 13], [0, 1, 2, 3]])
    np.testing.assert_array_equal(blk.labels, [[104, 105, 106, 107], [106, 107, 108, 109],
                                               [111, 111, 111, 111], [101, 102, 103, 104]])
    # Response ends mid-block (label 7 unsupervised); label 9 is supervised again but after a gap -> excluded;
    # the sequence ends after label 11; the dummy block has no supervised slot.
    np.testing.assert_array_equal(blk.eval_mask, [[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(blk.prev_tokens, [[103, 104, 105, 106], [105, 106, 107, 108],
                                                    [110, 111, 111, 111], [100, 101, 102, 103]])
    np.testing.assert_array_equal(blk.target_positions, [[3, 4, 5, 6], [5, 6, 7, 8], [10, 11, 11, 11],
                                                         [0, 1, 2, 3]])
    assert blk.eval_mask.dtype == bool and blk.labels.dtype == jnp.int32
    np.testing.assert_array_equal(blk.anchors, anchors)
    np.testing.assert_array_equal(blk.valid, valid)


def _np_blocks(tokens, loss_mask, anchors, valid, G, mask_id):
    T = len(tokens)
    out = {n: np.zeros((len(anchors), G), np.int64) for n in
           ("input_ids", "positions", "labels", "eval_mask", "prev_tokens", "target_positions")}
    for b, (a, v) in enumerate(zip(anchors, valid)):
        alive = bool(v)
        for k in range(G):
            out["input_ids"][b, k] = tokens[a] if k == 0 else mask_id
            out["positions"][b, k] = a + k
            out["labels"][b, k] = tokens[min(a + k + 1, T - 1)]
            alive = alive and a + k + 1 < T and bool(loss_mask[a + k + 1])
            out["eval_mask"][b, k] = alive
            out["prev_tokens"][b, k] = tokens[min(a + k, T - 1)]
            out["target_positions"][b, k] = min(a + k, T - 1)
    return out


def test_sample_and_build_vmapped_batch():
    rng = np.random.default_rng(6)
    T, K, G = 40, 8, 5
    tokens = rng.integers(0, 50, size=(2, T)).astype(np.int32)
    loss_mask = np.zeros((2, T), bool)
    loss_mask[0, 10:37] = True
    loss_mask[1, 5:9] = True
    loss_mask[1, 35:40] = True                       # 3 + 4 = 7 candidates < K: one dummy block

    def per_seq(key, toks, lm):
        anchors, valid = sample_anchors(key, lm, K)
        return build_blocks(toks, lm, anchors, valid, G, 99)

    keys = jax.random.split(jax.random.key(7), 2)
    blk = jax.jit(jax.vmap(per_seq))(keys, jnp.asarray(tokens), jnp.asarray(loss_mask))
    assert blk.input_ids.shape == (2, K, G) and blk.anchors.shape == (2, K)
    for i in range(2):
        single = per_seq(keys[i], jnp.asarray(tokens[i]), jnp.asarray(loss_mask[i]))
        for name in ("input_ids", "positions", "labels", "eval_mask", "prev_tokens", "target_positions",
                     "anchors", "valid"):
            np.testing.assert_array_equal(getattr(blk, name)[i], getattr(single, name), err_msg=name)
        ref = _np_blocks(tokens[i], loss_mask[i], np.asarray(blk.anchors[i]), np.asarray(blk.valid[i]), G, 99)
        for name, val in ref.items():
            np.testing.assert_array_equal(np.asarray(getattr(blk, name)[i]), val, err_msg=name)
        # A sampled anchor always has its first label supervised.
        np.testing.assert_array_equal(blk.eval_mask[i, :, 0], blk.valid[i])
    assert int(blk.valid[0].sum()) == K and int(blk.valid[1].sum()) == 7

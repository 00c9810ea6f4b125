"""Rejection sampling against a float64 NumPy reference and exact distributional identities."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dspark_jax.decoding.rejection import accept_flags, residual_distribution, verify


def np_accept_flags(u, pt_x, pd_x, n):
    out = np.zeros(u.shape, bool)
    for b in range(u.shape[0]):
        for k in range(u.shape[1]):
            if k >= n[b] or not u[b, k] < min(1.0, pt_x[b, k] / pd_x[b, k]):
                break
            out[b, k] = True
    return out


def np_residual(pt, pd):
    r = np.maximum(pt.astype(np.float64) - pd, 0)
    return r / r.sum() if r.sum() > 1e-12 else pt


def _dist(rng, v, zeros=0):
    p = rng.dirichlet(np.ones(v))
    if zeros:
        p[rng.choice(v, zeros, replace=False)] = 0
        p /= p.sum()
    return p


def test_accept_flags_match_numpy():
    rng = np.random.default_rng(0)
    u = rng.uniform(size=(64, 5))
    pt, pd = rng.uniform(0, 1, (64, 5)), rng.uniform(0.01, 1, (64, 5))
    n = rng.integers(0, 6, 64)
    got = np.asarray(accept_flags(jnp.asarray(u, jnp.float32), jnp.asarray(pt, jnp.float32),
                                  jnp.asarray(pd, jnp.float32), jnp.asarray(n)))
    np.testing.assert_array_equal(got, np_accept_flags(u.astype(np.float32), pt.astype(np.float32),
                                                       pd.astype(np.float32), n))


def test_residual_matches_numpy_and_falls_back_to_target():
    rng = np.random.default_rng(1)
    for _ in range(10):
        pt, pd = _dist(rng, 12, 3), _dist(rng, 12, 2)
        np.testing.assert_allclose(np.asarray(residual_distribution(jnp.asarray(pt, jnp.float32),
                                                                    jnp.asarray(pd, jnp.float32))),
                                   np_residual(pt, pd), atol=1e-6)
    same = _dist(rng, 12)
    np.testing.assert_allclose(np.asarray(residual_distribution(jnp.asarray(same), jnp.asarray(same))), same,
                               atol=1e-6)


def _run_verify(key, draft, pd, pt, n):
    """draft [B, G]; pd [B, G, V]; pt [B, G+1, V] (all in the full vocabulary)."""
    pd_x = jnp.take_along_axis(pd, draft[..., None], -1)[..., 0]
    full_at = lambda k: jnp.take_along_axis(pd, k[:, None, None], 1)[:, 0]  # noqa: E731
    return verify(key, draft, pd_x, full_at, pt, n)


def _sampled(run, draws: int):
    """`run(key)` for keys 0..draws-1 in one compiled call (leaves stacked on a leading [draws] axis)."""
    return jax.jit(jax.vmap(run))(jax.vmap(jax.random.key)(jnp.arange(draws)))


def test_all_accepted_gives_bonus_from_last_target_row():
    v, g = 6, 3
    rng = np.random.default_rng(2)
    p = np.stack([_dist(rng, v) for _ in range(g + 1)]).astype(np.float32)
    draft = jnp.asarray([[int(np.argmax(p[k])) for k in range(g)]])
    pd = jnp.asarray(p[None, :g])
    out = _run_verify(jax.random.key(0), draft, pd, jnp.asarray(p[None]), jnp.asarray([g]))
    assert int(out.num_accepted[0]) == g and bool(out.accepted.all())
    bonus = _sampled(lambda key: _run_verify(key, draft, pd, jnp.asarray(p[None]), jnp.asarray([g])), 2000)
    freq = np.bincount(np.asarray(bonus.next_token[:, 0]), minlength=v) / 2000
    np.testing.assert_allclose(freq, p[g], atol=0.04)


def test_none_accepted_samples_the_residual():
    v = 5
    pt = np.array([[0.0, 0.5, 0.5, 0.0, 0.0], [0.2] * 5], np.float32)[None]
    pd = np.array([[0.6, 0.4, 0.0, 0.0, 0.0]], np.float32)[None]
    draft = jnp.asarray([[0]])  # p_t(0) = 0: always rejected
    outs = _sampled(lambda key: _run_verify(key, draft, jnp.asarray(pd), jnp.asarray(pt), jnp.asarray([1])), 500)
    assert (np.asarray(outs.num_accepted) == 0).all()
    freq = np.bincount(np.asarray(outs.next_token[:, 0]), minlength=v) / 500
    expected = np_residual(pt[0, 0], pd[0, 0])  # (0, .1, .5) / .6
    np.testing.assert_allclose(freq, expected, atol=0.06)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_draft_distribution_costs_drafts_not_losslessness(bad):
    """A drafter whose p_d is NaN / inf (a diverged checkpoint) gets every draft rejected and the token drawn from
    p_t itself: the output distribution stays the target's."""
    v = 5
    pt = np.array([[0.1, 0.4, 0.5, 0.0, 0.0], [0.2] * 5], np.float32)[None]
    pd = np.full((1, 1, v), bad, np.float32)
    outs = _sampled(lambda key: _run_verify(key, jnp.asarray([[1]]), jnp.asarray(pd), jnp.asarray(pt),
                                            jnp.asarray([1])), 500)
    assert (np.asarray(outs.num_accepted) == 0).all()
    freq = np.bincount(np.asarray(outs.next_token[:, 0]), minlength=v) / 500
    np.testing.assert_allclose(freq, pt[0, 0], atol=0.06)


def test_zero_length_proposal_samples_first_target_row():
    pt = jnp.asarray(np.array([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]], np.float32))
    out = _run_verify(jax.random.key(0), jnp.asarray([[1]]), jnp.asarray([[[0.0, 1.0, 0.0]]]), pt, jnp.asarray([0]))
    assert int(out.num_accepted[0]) == 0 and not bool(out.accepted.any()) and int(out.next_token[0]) == 1


def test_greedy_one_hot_is_argmax_matching():
    v, g = 7, 4
    rng = np.random.default_rng(3)
    t_arg = rng.integers(0, v, g + 1)
    d_arg = t_arg[:g].copy()
    d_arg[2] = (d_arg[2] + 1) % v  # first mismatch at position 2
    pt = jax.nn.one_hot(t_arg, v)[None]
    pd = jax.nn.one_hot(d_arg, v)[None]
    out = _run_verify(jax.random.key(0), jnp.asarray(d_arg[None]), pd, pt, jnp.asarray([g]))
    assert int(out.num_accepted[0]) == 2 and int(out.next_token[0]) == t_arg[2]


@pytest.mark.parametrize("seed", [0, 1])
def test_one_step_output_distribution_is_the_target(seed):
    """x ~ p_d, verify → committed first token ~ p_t exactly (chi-square), acceptance = Σ min(p_t, p_d)."""
    v, n = 8, 40000
    rng = np.random.default_rng(seed)
    pt, pd = _dist(rng, v, 2), _dist(rng, v, 1)
    keys = jax.random.split(jax.random.key(seed), n)

    def one(key):
        kx, kv = jax.random.split(key)
        x = jax.random.categorical(kx, jnp.log(jnp.asarray(pd, jnp.float32)))
        out = _run_verify(kv, x[None, None], jnp.asarray(pd, jnp.float32)[None, None],
                          jnp.asarray(np.stack([pt, pt]), jnp.float32)[None], jnp.asarray([1]))
        first = jnp.where(out.num_accepted[0] > 0, x, out.next_token[0])
        return first, out.num_accepted[0]

    first, acc = jax.vmap(one)(keys)
    counts = np.bincount(np.asarray(first), minlength=v)
    support = pt > 0
    assert counts[~support].sum() == 0
    assert stats.chisquare(counts[support], pt[support] * n).pvalue > 1e-3
    np.testing.assert_allclose(np.asarray(acc).mean(), np.minimum(pt, pd).sum(), atol=0.01)


# ---- the lean target side (LazyTokenProbs) against the dense token_probs ----------------------------------

from dspark_jax.models.layout import make_layout  # noqa: E402
from dspark_jax.sampling import FilterMode, SamplingParams, lazy_token_probs, token_probs  # noqa: E402
from dspark_jax.sampling.threshold import NUCLEUS_CANDIDATES  # noqa: E402


def _flat_round(seed, temperature, top_k, top_p, g=4):
    """A flattened verification bucket (with padding rows) for len(temperature) requests: logits [T, V], drafts
    half from the target's argmax (long acceptance), half random; draft distributions over the full vocab."""
    rng = np.random.default_rng(seed)
    b, v = len(temperature), 2 * NUCLEUS_CANDIDATES
    n = jnp.asarray(rng.integers(0, g + 1, b), jnp.int32)
    layout = make_layout(n + 1, jnp.zeros((b,), jnp.int32), int(n.sum()) + b + 3, g + 1)
    params = SamplingParams(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                            jnp.asarray(top_p, jnp.float32))
    row_params = jax.tree.map(lambda a: a[layout.slot], params)
    logits = jnp.asarray(rng.normal(size=(layout.bucket, v)).astype(np.float32) * 3)
    target_argmax = jnp.argmax(jnp.concatenate([logits, logits[:1]])[layout.grid[:, :g]], -1)
    draft = jnp.where(jnp.asarray(rng.random((b, g)) < 0.6), target_argmax,
                      jnp.asarray(rng.integers(0, v, (b, g)))).astype(jnp.int32)
    pd = jax.nn.softmax(jnp.asarray(rng.normal(size=(b, g, v)).astype(np.float32)) * 3, -1)
    pd = pd.at[jnp.arange(b)[:, None], jnp.arange(g)[None], draft].add(0.3)
    pd = pd / pd.sum(-1, keepdims=True)
    mode = FilterMode.for_params(np.asarray(top_k), np.asarray(top_p))
    return logits, row_params, mode, layout, draft, pd, n


def _verify_both(logits, row_params, mode, layout, draft, pd, n):
    """A jitted key -> (dense verdict, lean verdict)."""
    pd_x = jnp.take_along_axis(pd, draft[..., None], -1)[..., 0]
    full_at = lambda k: jnp.take_along_axis(pd, k[:, None, None], 1)[:, 0]  # noqa: E731

    @jax.jit
    def run(key):
        dense = verify(key, draft, pd_x, full_at, token_probs(logits, row_params, mode), n, row_index=layout.grid)
        lean = verify(key, draft, pd_x, full_at, lazy_token_probs(logits, row_params, mode), n,
                      row_index=layout.grid)
        return dense, lean
    return run


@pytest.mark.parametrize("case", [
    ([0.0, 0.0, 0.0], [0, 0, 0], [1.0, 1.0, 1.0]),  # all greedy: only the argmax is computed
    ([0.0, 1.0, 1.0, 0.7], [0, 0, 20, 0], [1.0, 1.0, 0.9, 0.8]),  # mixed, top-p beyond the candidates
    ([1.0, 0.5], [5, 40], [0.6, 1.0]),  # every request with top-k
])
def test_lean_verification_equals_dense(case):
    """Same accepted drafts and next tokens, key by key, as verification on the dense [T, V] token_probs."""
    args = _flat_round(1, *case)
    run = _verify_both(*args)
    accepted = 0
    for i in range(12):
        dense, lean = run(jax.random.key(i))
        for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(lean)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        accepted += int(lean.num_accepted.sum())
    assert accepted > 0
    if case[0][0] == 0.0:  # greedy: argmax matching, next token = target argmax at the stopping row
        logits, _, _, layout, draft, _, n = args
        grid = jnp.concatenate([logits, logits[:1]])[layout.grid]
        t_arg = np.asarray(jnp.argmax(grid, -1))
        a = int(lean.num_accepted[0])
        assert a == next((k for k in range(int(n[0])) if draft[0, k] != t_arg[0, k]), int(n[0]))
        assert int(lean.next_token[0]) == t_arg[0, a]

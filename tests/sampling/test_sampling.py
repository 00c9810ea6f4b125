"""Sampling transforms against a float64 NumPy reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.sampling import (FilterMode, SamplingParams, filter_logits, sample, token_probs,
                                          top_k_candidates)


def np_filtered_probs(logits, temperature, top_k, top_p):
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x)
    keep = np.ones_like(x, bool)
    if top_k > 0:
        keep[order[top_k:]] = False
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    if top_p < 1.0:
        cum = 0.0
        nucleus = np.zeros_like(keep)
        for i in order:
            if not keep[i]:
                continue
            if cum < top_p:
                nucleus[i] = True
            cum += p[i]
        keep &= nucleus
        p = np.exp(x - x.max()) * keep
        p /= p.sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (1.0, 10, 0.5), (2.0, 3, 0.95)])
def test_filtered_probs_match_numpy(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
    params = SamplingParams.create(3, temperature, top_k, top_p)
    mode = FilterMode.for_params(top_k, top_p)
    got = np.asarray(token_probs(jnp.asarray(logits), params, mode))
    for row in range(3):
        np.testing.assert_allclose(got[row], np_filtered_probs(logits[row], temperature, top_k, top_p), atol=1e-6)


def test_per_request_parameters_in_one_batch():
    logits = np.random.default_rng(1).normal(size=(3, 40)).astype(np.float32)
    params = SamplingParams(temperature=jnp.array([1.0, 0.5, 1.0]), top_k=jnp.array([0, 4, 2], jnp.int32),
                            top_p=jnp.array([0.9, 1.0, 1.0]))
    got = np.asarray(token_probs(jnp.asarray(logits), params, FilterMode(max_top_k=4, top_p=True)))
    for row, (t, k, p) in enumerate([(1.0, 0, 0.9), (0.5, 4, 1.0), (1.0, 2, 1.0)]):
        np.testing.assert_allclose(got[row], np_filtered_probs(logits[row], t, k, p), atol=1e-6)


def test_greedy_rows_are_argmax_and_one_hot():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 30)).astype(np.float32))
    params = SamplingParams(temperature=jnp.array([0.0, 1.0]), top_k=jnp.zeros(2, jnp.int32), top_p=jnp.ones(2))
    probs = np.asarray(token_probs(logits, params, FilterMode()))
    assert probs[0].argmax() == int(jnp.argmax(logits[0])) and probs[0].max() == 1.0
    toks = [int(sample(jax.random.key(i), logits, params, FilterMode())[0]) for i in range(5)]
    assert set(toks) == {int(jnp.argmax(logits[0]))}
    # an all-greedy batch (which skips the noise and the softmax) gives the same rows as in a mixed batch
    greedy = SamplingParams.create(2, 0.0)
    for mode in (FilterMode(), FilterMode(max_top_k=4, top_p=True)):
        np.testing.assert_array_equal(np.asarray(token_probs(logits, greedy, mode)),
                                      np.asarray(jax.nn.one_hot(jnp.argmax(logits, -1), 30)))
        np.testing.assert_array_equal(np.asarray(sample(jax.random.key(0), logits, greedy, mode)),
                                      np.asarray(jnp.argmax(logits, -1)))


def test_sample_frequencies_follow_filtered_distribution():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(1, 8)).astype(np.float32))
    params = SamplingParams.create(1, 0.8, 0, 0.9)
    mode = FilterMode.for_params(0, 0.9)
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: sample(k, logits, params, mode)[0])(keys))
    freq = np.bincount(draws, minlength=8) / len(draws)
    expected = np.asarray(token_probs(logits, params, mode))[0]
    np.testing.assert_allclose(freq, expected, atol=0.015)
    assert (freq[expected == 0] == 0).all()


@pytest.mark.parametrize("quantized", [False, True])
def test_top_p_within_top_k_candidates_is_the_full_vocabulary_filter(quantized):
    """Sampling among the top-k candidates (top-p applied inside them) is exactly token_probs over the whole
    vocabulary: same kept set, same probabilities; ties of the k-th value past the candidates are detected."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(6, 300)).astype(np.float32) * 3
    if quantized:  # many ties, the k-th value among them
        logits = np.round(logits)
    params = SamplingParams(temperature=jnp.array([0.7, 1.0, 1.3, 0.5, 1.0, 2.0]),
                            top_k=jnp.array([20, 5, 20, 1, 12, 20], jnp.int32),
                            top_p=jnp.array([0.8, 1.0, 0.5, 1.0, 0.95, 0.3]))
    mode = FilterMode.for_params(np.asarray(params.top_k), np.asarray(params.top_p))
    assert mode.all_top_k
    ids, z, complete = top_k_candidates(jnp.asarray(logits), params, mode)
    dense = np.asarray(token_probs(jnp.asarray(logits), params, mode))
    kept_everywhere = np.isfinite(np.asarray(z)).sum(1) == (dense > 0).sum(1)
    assert bool(complete) == bool(kept_everywhere.all())
    if quantized:
        assert not bool(complete)  # rounding makes the k-th value of some row tie past the candidates
    rows = np.flatnonzero(kept_everywhere)
    assert len(rows) >= 3
    for r in rows:
        cand = np.zeros(300)
        zr = np.asarray(z[r], np.float64)
        np.add.at(cand, np.asarray(ids[r]), np.where(np.isfinite(zr), np.exp(zr - zr.max()), 0.0))
        np.testing.assert_allclose(cand / cand.sum(), dense[r], atol=1e-6)


@pytest.mark.parametrize("quantized", [False, True])
def test_top_k_sampling_frequencies_follow_filtered_distribution(quantized):
    """The candidate draw (and its full-row fallback when ties spill past the candidates) samples token_probs."""
    logits = np.random.default_rng(4).normal(size=(1, 64)).astype(np.float32) * 2
    if quantized:
        logits = np.round(logits)
    params = SamplingParams.create(1, 0.7, 8, 0.8)
    mode = FilterMode.for_params(8, 0.8)
    keys = jax.random.split(jax.random.key(1), 20000)
    draws = np.asarray(jax.vmap(lambda k: sample(k, jnp.asarray(logits), params, mode)[0])(keys))
    freq = np.bincount(draws, minlength=64) / len(draws)
    expected = np.asarray(token_probs(jnp.asarray(logits), params, mode))[0]
    np.testing.assert_allclose(freq, expected, atol=0.015)
    assert (freq[expected == 0] == 0).all()


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(temperature=float("nan"))])
def test_invalid_sampling_values_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams.create(1, **bad)


def test_filter_logits_without_filters_is_temperature_only():
    logits = jnp.asarray([[1.0, 2.0, 3.0]])
    out = filter_logits(logits, SamplingParams.create(1, 2.0), FilterMode())
    np.testing.assert_allclose(np.asarray(out), [[0.5, 1.0, 1.5]])


# ---- threshold filters without a sort, fast argmax / categorical, lazy token_probs ------------------------

from dspark_jax.sampling import categorical, fast_argmax, filter_threshold, lazy_token_probs  # noqa: E402
from dspark_jax.sampling.threshold import NUCLEUS_CANDIDATES  # noqa: E402


def np_kept(x, top_k, top_p):
    """Reference kept set on scaled float32 values x (float64 masses): the top-k value and its ties, then the
    values whose mass strictly above (within the top-k set) is < top_p · mass — every tie of a kept value."""
    vals = np.sort(x)[::-1]
    kth = vals[top_k - 1] if top_k > 0 else -np.inf
    keep = x >= kth
    if top_p >= 1.0:
        return keep
    p = np.where(keep, np.exp(x.astype(np.float64) - x.max()), 0.0)
    uniq, inv = np.unique(x, return_inverse=True)  # ascending distinct values
    group = np.bincount(inv, weights=p, minlength=len(uniq))
    above = np.cumsum(group[::-1])[::-1] - group  # mass strictly above each distinct value
    ok = (above < top_p * p.sum()) & (uniq >= kth)
    return x >= uniq[ok].min()


def _kept(logits, params, mode):
    return np.isfinite(np.asarray(jax.jit(filter_logits, static_argnums=2)(jnp.asarray(logits), params, mode)))


@pytest.mark.parametrize("quantized", [False, True])
def test_threshold_filters_match_the_sort_definition_including_ties(quantized):
    """Rows with and without top-k, nucleus inside and beyond the top-k candidates (full-row search), ties."""
    rng = np.random.default_rng(4 + quantized)
    b, v = 12, 3 * NUCLEUS_CANDIDATES
    logits = rng.normal(size=(b, v)).astype(np.float32) * np.array([0.3, 1, 3, 8] * 3, np.float32)[:, None]
    if quantized:
        logits = np.round(logits * 2) / 2  # many ties, exact zeros
    temp = np.array([1.0, 0.5] * 6, np.float32)  # 1 / T exact: the reference scales the same way
    top_k = np.array([0, 0, 0, 0, 1, 7, 50, 0, 0, 3, 0, 40], np.int32)
    top_p = np.array([0.9, 0.37, 0.95, 0.6, 0.9, 0.5, 0.83, 1.0, 0.99, 1.0, 0.2, 0.7], np.float32)
    params = SamplingParams(jnp.asarray(temp), jnp.asarray(top_k), jnp.asarray(top_p))
    got = _kept(logits, params, FilterMode.for_params(top_k, top_p))
    x = logits * (np.float32(1) / temp)[:, None]
    for r in range(b):
        np.testing.assert_array_equal(got[r], np_kept(x[r], top_k[r], top_p[r]), err_msg=f"row {r}")
    assert got[[0, 1, 2, 3]].sum(1).max() > NUCLEUS_CANDIDATES  # the full-row search did run
    # every request with top-k: the candidate-only mode gives the same sets
    k_rows = top_k > 0
    sub = SamplingParams(*(jnp.asarray(a[k_rows]) for a in (temp, top_k, top_p)))
    mode = FilterMode.for_params(top_k[k_rows], top_p[k_rows])
    assert mode.all_top_k
    np.testing.assert_array_equal(_kept(logits[k_rows], sub, mode), got[k_rows])


def test_top_p_threshold_among_tiny_and_zero_logits():
    """The nucleus ends among values within 2^-100 of zero (where the arithmetic compare needs care)."""
    v = 2 * NUCLEUS_CANDIDATES
    base = np.full(v, -30.0, np.float32)
    base[:40] = 3.0
    # normal floats whose differences are denormal (flushed to zero by XLA:CPU), exact zeros, ±0
    tiny = np.array([0.0, 1.3e-38, 1.25e-38, -1.2e-38, -1.22e-38, 2e-33, 1e-31, 1.2e-38, -0.0, 4e-30], np.float32)
    base[40:50] = tiny
    rows, ps = [], []
    for p in np.linspace(0.987, 0.99999, 24, dtype=np.float32):  # mass above each tiny value: 40 + j · e^-3
        rows.append(np.random.default_rng(len(rows)).permutation(base))
        ps.append(p)
    logits = np.stack(rows)
    params = SamplingParams(jnp.ones(len(ps)), jnp.zeros(len(ps), jnp.int32), jnp.asarray(ps))
    got = _kept(logits, params, FilterMode(top_p=True))
    for r in range(len(ps)):
        np.testing.assert_array_equal(got[r], np_kept(logits[r], 0, ps[r]), err_msg=f"row {r}")
    assert len({int(n) for n in got.sum(1)}) >= 7  # the boundary moved through the tiny values


def test_top_p_one_is_off_in_a_top_p_batch():
    logits = jnp.asarray(np.random.default_rng(6).normal(size=(2, 300)).astype(np.float32) * 5)
    params = SamplingParams(jnp.ones(2), jnp.zeros(2, jnp.int32), jnp.asarray([1.0, 0.5]))
    assert _kept(logits, params, FilterMode(top_p=True))[0].all()
    assert filter_threshold(logits, SamplingParams.create(2), FilterMode()) is None


def test_fast_argmax_is_jnp_argmax():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(9, 500)).astype(np.float32)
    x[1, [3, 80]] = 10.0  # ties: the first index
    x[2] = np.round(x[2])
    x[3, ::2] = -np.inf
    x[4] = 0.0
    x[4, 17] = 0.0  # max exactly 0, all tied
    x[5] -= 5.0
    x[5, 123] = 0.0
    x[6] = -1.0
    x[6, [10, 20]] = [1.25e-38, 1.3e-38]  # their difference flushes to zero: the jnp.argmax fallback
    x[7] = -x[7] ** 2 - 1e-20
    x[8, 42] = 1e30
    for batch in (x, np.where(np.arange(9)[:, None] == 0, np.nan, x), np.where(np.arange(500) == 9, np.inf, x)):
        np.testing.assert_array_equal(np.asarray(jax.jit(fast_argmax)(jnp.asarray(batch))),
                                      np.asarray(jnp.argmax(jnp.asarray(batch), -1)))


def test_fast_argmax_is_jnp_argmax_across_blocks():
    """Rows of several `ARGMAX_BLOCK`s (the last one padded): ties across blocks, the maximum in the padded block,
    ±inf, a NaN in one row of the batch, +inf beside −inf in one block (a NaN block sum: the whole-row fallback)."""
    from dspark_jax.sampling.exact_compare import ARGMAX_BLOCK
    rng = np.random.default_rng(17)
    v = 4 * ARGMAX_BLOCK + 123
    x = rng.normal(size=(8, v)).astype(np.float32)
    x[0, [ARGMAX_BLOCK + 5, 3 * ARGMAX_BLOCK + 1]] = 9.0  # a tie in two blocks: the first block's
    x[1, [ARGMAX_BLOCK - 1, ARGMAX_BLOCK]] = 9.0  # a tie on both sides of a block edge
    x[2, v - 1] = 9.0  # the maximum in the padded last block
    x[3] = -np.inf
    x[3, 2 * ARGMAX_BLOCK + 7] = -1e30
    x[4, [7, 3 * ARGMAX_BLOCK]] = [np.inf, np.inf]
    x[5, [0, ARGMAX_BLOCK]] = [-0.0, 0.0]
    x[5, 1:] -= 10.0
    x[5, ARGMAX_BLOCK] = 0.0  # -0.0 and 0.0 are equal: the first
    x[6] = np.round(x[6])
    x[7, ::2] = -np.inf
    nan_row = x.copy()
    nan_row[6, 2 * ARGMAX_BLOCK + 9] = np.nan
    inf_pair = x.copy()
    inf_pair[7, [ARGMAX_BLOCK + 1, ARGMAX_BLOCK + 2]] = [np.inf, -np.inf]  # a NaN block sum without a NaN
    for batch in (x, nan_row, inf_pair, x[:1], x[:, :ARGMAX_BLOCK]):
        np.testing.assert_array_equal(np.asarray(fast_argmax(jnp.asarray(batch))),
                                      np.asarray(jnp.argmax(jnp.asarray(batch), -1)))


def test_argmax_and_finite_is_fast_argmax_and_isfinite():
    """The finite check read from the argmax's block sums: equal to jnp.all(jnp.isfinite(x), -1) on finite rows,
    rows with one NaN, +inf or −inf (in the padded last block too), +inf beside −inf, and finite rows whose block
    sums overflow (the whole-row check); the argmax equal to jnp.argmax throughout."""
    from dspark_jax.sampling import argmax_and_finite
    from dspark_jax.sampling.exact_compare import ARGMAX_BLOCK
    rng = np.random.default_rng(19)
    v = 3 * ARGMAX_BLOCK + 77
    x = rng.normal(size=(6, v)).astype(np.float32)
    cases = {"finite": x}
    for name, (row, col, value) in {"nan": (1, 5, np.nan), "+inf": (2, ARGMAX_BLOCK + 3, np.inf),
                                    "-inf": (3, 2 * ARGMAX_BLOCK, -np.inf), "-inf in the padded block": (4, v - 1, -np.inf),
                                    "+inf in the padded block": (5, v - 2, np.inf)}.items():
        y = x.copy()
        y[row, col] = value
        cases[name] = y
    pair = x.copy()
    pair[0, [10, 11]] = [np.inf, -np.inf]
    cases["+inf beside -inf"] = pair
    overflow = x.copy()
    overflow[2, :ARGMAX_BLOCK] = 3e38  # finite entries whose block sum overflows to inf
    cases["overflowing sum"] = overflow
    cases["one block"] = x[:, :ARGMAX_BLOCK]
    for name, batch in cases.items():
        idx, finite = argmax_and_finite(jnp.asarray(batch))
        np.testing.assert_array_equal(np.asarray(finite), np.isfinite(batch).all(-1), err_msg=name)
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(jnp.argmax(jnp.asarray(batch), -1)), err_msg=name)


def test_sample_checked_is_sample_and_isfinite():
    """sample_checked's tokens are sample's and its flags jnp.isfinite's, for a greedy batch (the argmax's pass)
    and a mixed one (the separate check), with a NaN row and an inf row."""
    from dspark_jax.sampling import sample_checked
    rng = np.random.default_rng(23)
    logits = rng.normal(size=(4, 3000)).astype(np.float32) * 2
    logits[1, 7] = np.nan
    logits[2, 2999] = np.inf
    logits = jnp.asarray(logits)
    keys = jax.random.split(jax.random.key(3), 4)
    for temps in ((0.0, 0.0, 0.0, 0.0), (0.0, 0.7, 0.0, 1.0)):
        params = SamplingParams(temperature=jnp.asarray(temps, jnp.float32), top_k=jnp.zeros((4,), jnp.int32),
                                top_p=jnp.ones((4,), jnp.float32))
        mode = FilterMode()
        tokens, finite = jax.jit(sample_checked, static_argnames="mode")(keys, logits, params, mode=mode)
        np.testing.assert_array_equal(np.asarray(tokens), np.asarray(sample(keys, logits, params, mode)))
        np.testing.assert_array_equal(np.asarray(finite), [True, False, False, True])


def test_categorical_is_jax_random_categorical_row_by_row():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(6, 700)).astype(np.float32) * 3
    logits[2, rng.random(700) < 0.9] = -np.inf
    logits = jnp.asarray(logits)
    for i in range(20):
        keys = jax.random.split(jax.random.key(i), 6)  # one key per row: row b's draw uses keys[b] only
        expected = [int(jax.random.categorical(keys[b], logits[b])) for b in range(6)]
        np.testing.assert_array_equal(np.asarray(jax.jit(categorical)(keys, logits)), expected)
        # one key for the batch: split into one per row
        np.testing.assert_array_equal(np.asarray(categorical(jax.random.key(i), logits)),
                                      np.asarray(categorical(jax.random.split(jax.random.key(i), 6), logits)))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (1.0, 20, 0.9), (0.7, 0, 0.8)])
def test_lazy_token_probs_is_token_probs(temperature, top_k, top_p):
    rng = np.random.default_rng(9)
    t, v = 6, 2 * NUCLEUS_CANDIDATES
    logits = jnp.asarray(rng.normal(size=(t, v)).astype(np.float32) * 3)
    params = SamplingParams(jnp.asarray([temperature] * 4 + [0.0, 1.0], jnp.float32),
                            jnp.full((t,), top_k, jnp.int32), jnp.full((t,), top_p, jnp.float32))
    if temperature == 0:  # an all-greedy batch (the lazy statistics are skipped)
        params = SamplingParams.create(t)
    mode = FilterMode.for_params(top_k, top_p)
    dense = np.asarray(jax.jit(token_probs, static_argnums=2)(logits, params, mode))
    lazy = jax.jit(lazy_token_probs, static_argnums=2)(logits, params, mode)
    rows = jnp.repeat(jnp.arange(t), 8)
    toks = jnp.asarray(rng.integers(0, v, t * 8)).at[::8].set(jnp.argmax(logits, -1)).at[1::8].set(
        jnp.argsort(-logits, -1)[:, 3])
    at = np.asarray(jax.jit(lambda p, r, k: p[r, k])(lazy, rows, toks))
    full = np.asarray(jax.jit(lambda p, r: p[r])(lazy, jnp.arange(t)[::-1]))[::-1]
    # same formula on the same per-row values; XLA:CPU may still pick different exp kernels (1 ulp) per fusion
    np.testing.assert_allclose(at, dense[np.asarray(rows), np.asarray(toks)], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(full, dense, rtol=1e-6, atol=1e-12)
    assert ((full > 0) == (dense > 0)).all()

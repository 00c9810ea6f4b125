"""Sampling transforms against a float64 NumPy reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.decoding.sampling import FilterMode, SamplingParams, filter_logits, sample, token_probs


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


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(temperature=float("nan"))])
def test_invalid_sampling_values_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams.create(1, **bad)


def test_filter_logits_without_filters_is_temperature_only():
    logits = jnp.asarray([[1.0, 2.0, 3.0]])
    out = filter_logits(logits, SamplingParams.create(1, 2.0), FilterMode())
    np.testing.assert_allclose(np.asarray(out), [[0.5, 1.0, 1.5]])

"""Prompt-lookup (n-gram) drafting: the match search against the plain Python reference
(`evaluation.lookup_simulation.lookup`), greedy identity with plain decoding in the jitted loop, the offline
simulation against the loop, and losslessness at temperature 1 (chi-square)."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.decoding.autoregressive import generate
from dspark_jax.decoding.sampling import FilterMode, SamplingParams
from dspark_jax.decoding.speculative import speculative_generate
from dspark_jax.drafters.ngram import NgramConfig, NgramDrafter, find_match, lookup_proposal
from dspark_jax.evaluation.lookup_simulation import lookup, simulate_rounds
from test_speculative import N_NEW, _batch, chi_square_pvalue, exact_joint, make_target, sampled_joint


def run_lookup(seq: list[int], n_max: int, n_min: int, gamma: int, width: int = 40) -> list[int]:
    tokens = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)
    last = jnp.asarray([len(seq) - 1], jnp.int32)
    end, n = find_match(tokens, last, n_max, n_min)
    if int(n[0]) == 0:
        assert int(end[0]) == -1
        return []
    return [int(t) for t in lookup_proposal(tokens, last, end, gamma)[0]]


@pytest.mark.parametrize("seq,expected", [
    ([5, 6, 7, 8, 5, 6], [7, 8, 5, 6, 7]),          # 2-gram match, continued periodically
    ([1, 2, 9, 1, 2, 3, 1, 2], [3, 1, 2, 3, 1]),    # two occurrences of "1 2": the most recent wins
    ([4, 4, 4, 4], [4, 4, 4, 4, 4]),                 # overlapping matches: period 1
    ([1, 2, 3, 4, 5], []),                            # no earlier occurrence at all
    ([7, 3, 1, 2, 7], [3, 1, 2, 7, 3]),              # 1-gram only, the match at the very start
    ([9, 8, 9], [8, 9, 8, 9, 8]),                    # a match right before the end (period 2)
    ([3, 1, 2, 3, 5, 1, 2, 3], [5, 1, 2, 3, 5]),     # the 3-gram beats a more recent 1-gram ("3" at 3)
])
def test_match_search_cases(seq, expected):
    assert lookup(seq, 3, 1, 5) == expected
    assert run_lookup(seq, 3, 1, 5) == expected


def test_match_search_against_reference_on_random_sequences():
    rng = np.random.default_rng(0)
    for trial in range(300):
        length = int(rng.integers(1, 30))
        seq = [int(t) for t in rng.integers(0, 4 if trial % 2 else 8, length)]
        n_min = int(rng.integers(1, 3))
        n_max = n_min + int(rng.integers(0, 3))
        gamma = int(rng.integers(1, 8))
        assert run_lookup(seq, n_max, n_min, gamma) == lookup(seq, n_max, n_min, gamma), (seq, n_max, n_min)


def test_match_search_in_a_batch_of_different_lengths():
    seqs = [[5, 6, 7, 5, 6], [1, 2, 3], [4, 4], [9, 1, 9, 1, 9, 1, 9]]
    width = 12
    tokens = jnp.asarray([s + [9] * (width - len(s)) for s in seqs], jnp.int32)  # padding that would match
    last = jnp.asarray([len(s) - 1 for s in seqs], jnp.int32)
    end, n = find_match(tokens, last, 3, 1)
    got = lookup_proposal(tokens, last, end, 4)
    for i, s in enumerate(seqs):
        ref = lookup(s, 3, 1, 4)
        assert (int(n[i]) > 0) == bool(ref)
        if ref:
            assert [int(t) for t in got[i]] == ref


def test_bad_ngram_configs_rejected():
    with pytest.raises(ValueError, match="n_min"):
        NgramConfig(n_max=1, n_min=2)
    with pytest.raises(ValueError, match="n_min"):
        NgramConfig(n_min=0)
    with pytest.raises(ValueError, match="gamma"):
        NgramConfig(block_size=0)


def _ngram(cfg, gamma, n_max=3, n_min=1):
    return nnx.split(NgramDrafter(NgramConfig(block_size=gamma, n_max=n_max, n_min=n_min), cfg.vocab_size))


REPETITIVE = [[5, 6, 7, 5, 6, 7, 5], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [20, 21], [3, 4, 3, 4, 3, 4, 3, 4]]


@pytest.mark.parametrize("gamma,n_max,n_min", [(g, *n) for g, n in itertools.product(
    [1, 3, 7], [(3, 1), (2, 2), (4, 2)])])
def test_greedy_ngram_equals_greedy_plain(gamma, n_max, n_min):
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _ngram(cfg, gamma, n_max, n_min)
    tokens, lens = _batch(REPETITIVE)
    kw = dict(max_new_tokens=24, stop_ids=())
    plain = generate(tg, ts, tokens, lens, jax.random.key(0), SamplingParams.create(4), **kw)
    spec = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(0), SamplingParams.create(4),
                                jnp.float32(0.0), **kw)
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(plain.tokens))
    rounds = np.asarray(spec.rounds)
    committed = np.asarray(spec.committed)
    for b in range(4):
        assert committed[b, :rounds[b]].sum() == 24 - 1  # the first token comes from the prefill
    if gamma > 1:  # a random tiny target loops quickly: lookup must save target forwards somewhere
        assert rounds.min() < 23


def test_rounds_without_a_match_cost_a_plain_step(monkeypatch):
    """When no request has a lookup match, the round verifies the anchors alone (width 1), not G + 1 rows."""
    from dspark_jax.decoding import speculative, verification
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _ngram(cfg, 5, n_max=3, n_min=3)
    widths = []
    real = verification.verify_round

    def spy(*args, **kw):
        widths.append(args[10].grid.shape[1])  # the layout's tokens per request, at trace time
        return real(*args, **kw)

    monkeypatch.setattr(speculative, "verify_round", spy)
    tokens, lens = _batch([[30, 31, 32, 33]])
    speculative_generate.__wrapped__(tg, ts, dg, ds, tokens, lens, jax.random.key(0), SamplingParams.create(1),
                                     jnp.float32(0.0), max_new_tokens=6, stop_ids=())
    assert sorted(widths) == [1, 6]  # both branches exist: the narrow one for empty proposals


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 0.8)])
def test_temperature_one_is_lossless(top_k, top_p):
    from test_speculative import V_SMALL
    tg, ts, cfg = make_target("gemma3", vocab_size=V_SMALL)
    dg, ds = _ngram(cfg, 2, n_max=2, n_min=1)
    params = SamplingParams.create(1, 1.0, top_k, top_p)
    mode = FilterMode.for_params(top_k, top_p)
    prompt = [1, 2, 1, 2, 1]  # a loop: lookup proposes "2 1"
    seqs, prob = exact_joint(tg, ts, prompt, params, mode)
    codes, sp = sampled_joint(tg, ts, dg, ds, prompt, params, mode)
    accepted = np.asarray(sp.accepted).sum(1)
    assert 0.1 < accepted.mean() < 2  # some lookup drafts accepted, some rejected
    assert chi_square_pvalue(codes, prob) > 1e-3
    assert N_NEW == 3


def test_offline_simulation_predicts_the_loop_rounds():
    """Replaying lookup over the greedy output gives the jitted loop's committed tokens round by round."""
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _ngram(cfg, 4)
    for prompt in REPETITIVE:
        tokens, lens = _batch([prompt])
        spec = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(0), SamplingParams.create(1),
                                    jnp.float32(0.0), max_new_tokens=20, stop_ids=())
        out = [int(t) for t in spec.tokens[0]]
        r = int(spec.rounds[0])
        assert [int(c) for c in spec.committed[0, :r]] == simulate_rounds(prompt, out, 3, 1, 4)

"""Prompt-lookup (n-gram) drafting: the match search against the plain Python reference
(`evaluation.lookup_simulation.lookup`), greedy identity with plain decoding in the jitted loop, the offline
simulation against the loop, and losslessness at temperature 1 (chi-square)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.decoding.autoregressive import generate
from dspark_jax.sampling import FilterMode, SamplingParams
from dspark_jax.decoding.speculative import speculative_generate
from dspark_jax.drafters.ngram import MAX_BLOCK_SIZE, NgramConfig, NgramDrafter, find_match, lookup_proposal
from dspark_jax.evaluation.lookup_simulation import lookup, lookup_rounds, simulate_rounds
from tests.decoding.test_speculative import N_NEW, _batch, chi_square_pvalue, exact_joint, make_target, sampled_joint


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
    NgramConfig(block_size=MAX_BLOCK_SIZE)
    with pytest.raises(ValueError, match=r"gamma\) must be in \[1, 64\], got 1000"):
        NgramConfig(block_size=1000)


def _ngram(cfg, gamma, n_max=3, n_min=1, **options):
    return nnx.split(NgramDrafter(NgramConfig(block_size=gamma, n_max=n_max, n_min=n_min, **options), cfg.vocab_size))


REPETITIVE = [[5, 6, 7, 5, 6, 7, 5], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [20, 21], [3, 4, 3, 4, 3, 4, 3, 4]]


def greedy_plain_and_speculative(tg, ts, dg, ds, prompts, max_new_tokens, threshold=0.0, **loop_options):
    """Plain greedy and greedy speculative decoding of the same batch: (plain output, speculative output)."""
    tokens, lens = _batch(prompts)
    kw = dict(max_new_tokens=max_new_tokens, stop_ids=())
    b = len(prompts)
    plain = generate(tg, ts, tokens, lens, jax.random.key(0), SamplingParams.create(b), **kw)
    spec = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(0), SamplingParams.create(b),
                                jnp.float32(threshold), **kw, **loop_options)
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(plain.tokens))
    return plain, spec


@pytest.mark.parametrize("gamma,n_max,n_min", [(1, 3, 1), (3, 2, 2), (7, 3, 1), (7, 4, 2)])
def test_greedy_ngram_equals_greedy_plain(gamma, n_max, n_min):
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _ngram(cfg, gamma, n_max, n_min)
    _, spec = greedy_plain_and_speculative(tg, ts, dg, ds, REPETITIVE, 24)
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
    from tests.decoding.test_speculative import V_SMALL
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


def test_offline_acceptance_counts_all_rounds_or_each_pairs_first_per_match_length():
    """prompt [1, 2, 3], output [1, 9, 1, 2, 3, 1, 2], 1-token matches, γ 2, by hand: round 1 proposes [2, 3] after
    the anchor 1 and misses (9); the anchor 9 matches nothing; the anchor 1 proposes [9, 1] and misses (2); the anchor
    2 proposes [3, 1] and both are accepted. All rounds: tested [3, 1], accepted [1, 1]; each pair's first round with
    a 1-token match alone (`first_only`, the prior a request without a record reads): tested [1, 0], accepted [0, 0]."""
    from dspark_jax.evaluation.lookup_simulation import conditional_acceptance
    pairs = [([1, 2, 3], [1, 9, 1, 2, 3, 1, 2])]
    assert conditional_acceptance(pairs, 1, 1, 2) == ([[3, 1]], [[1, 1]])
    assert conditional_acceptance(pairs, 1, 1, 2, first_only=True) == ([[1, 0]], [[0, 0]])
    assert conditional_acceptance(pairs * 2, 1, 1, 2, first_only=True) == ([[2, 0]], [[0, 0]])  # per pair
    # per match length: prompt [1, 2, 3, 1, 5], output [9, 1, 2, 6, 1, 7], n_max 2, γ 1 — the anchor 1 proposes 5 (a
    # 1-token match, missed: 2), the anchor 2 after [1, 2] proposes 3 (a 2-token match, missed: 6), the last anchor 1
    # proposes 2 (1-token, missed: 7); first_only keeps the first 1-token round and the 2-token one
    pairs = [([1, 2, 3, 1, 5], [9, 1, 2, 6, 1, 7])]
    assert conditional_acceptance(pairs, 2, 1, 1) == ([[2], [1]], [[0], [0]])
    assert conditional_acceptance(pairs, 2, 1, 1, first_only=True) == ([[1], [1]], [[0], [0]])


# ---- lookup confidence -------------------------------------------------------------------------------

def test_acceptance_statistics_are_counted_per_match_length_and_position():
    """commit compares the proposal of the round's match length with the committed tokens (accepted drafts, then
    the correction or bonus token), whichever draft was verified: position k is tested when the proposal agrees
    with the first k committed tokens and k < count, accepted when it agrees with the first k + 1."""
    from dspark_jax.drafters.base import RoundOutcome
    drafter = NgramDrafter(NgramConfig(block_size=4, n_max=2, n_min=1), 50)
    state = drafter.prefill(None, drafter.init_state(2, 16), None, jnp.asarray([[5, 6, 7, 5, 0], [1, 2, 3, 4, 5]]),
                            jnp.asarray([4, 5]))
    starts = jnp.asarray([4, 5])

    def commit(verified, count, num_verified, committed):
        return drafter.commit(None, state, None, jnp.asarray(verified), starts, jnp.asarray(count),
                              RoundOutcome(jnp.asarray(num_verified), jnp.asarray(committed, jnp.int32)))

    # row 0: anchor 6 at position 4 -> "5 6" matched (n = 2), proposal 7 5 6 7; 4 drafts verified, 2 accepted,
    # then the correction 9 (count 3). Row 1: anchor 9 at position 5 -> no match; nothing counted
    new = commit([[6, 7, 5, 6, 7], [9, 0, 0, 0, 0]], [3, 1], [4, 0], [[7, 5, 9, 0, 0], [3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(new.tested[0]), [[0, 0, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(np.asarray(new.accepted[0]), [[0, 0, 0, 0], [1, 1, 0, 0]])
    assert float(new.tested[1].sum()) == 0 and float(new.tested[0, 0].sum()) == 0
    anchors = [6, 0, 0, 0, 0], [9, 0, 0, 0, 0]
    cases = {  # case: (verified row 0, counts, drafts verified, committed row 0) -> row 0's (tested, accepted) at n = 2
        # 2 drafts verified, both accepted, bonus token 6 = the proposal's third: positions 0..2 tested and accepted
        "bonus": (([6, 7, 5, 6, 7], [3, 1], [2, 0], [7, 5, 6, 0, 0]), ([1, 1, 1, 0], [1, 1, 1, 0])),
        # another drafter's draft verified (the hybrid chose the model): 7 and 9 accepted, then 4 — the lookup's 5
        # at position 1 disagrees with the committed 9: tested and rejected there, nothing known after it
        "other drafter": (([6, 7, 9, 9, 9], [3, 1], [4, 0], [7, 9, 4, 0, 0]), ([1, 1, 0, 0], [1, 0, 0, 0])),
        # no draft verified (a zero-draft round): the one committed token tests position 0
        "zero drafts": ((anchors[0], [1, 1], [0, 0], [7, 0, 0, 0, 0]), ([1, 0, 0, 0], [1, 0, 0, 0])),
        # cut by a stop token or the budget at count 2: positions past it are unknown, not rejections
        "cut": (([6, 7, 5, 6, 7], [2, 0], [4, 0], [7, 5, 6, 7, 1]), ([1, 1, 0, 0], [1, 1, 0, 0])),
    }
    for case, ((verified, count, nv, committed), (tested, accepted)) in cases.items():
        out = commit([verified, anchors[1]], count, nv, [committed, [3, 0, 0, 0, 0]])
        np.testing.assert_array_equal(np.asarray(out.tested[0, 1]), tested, err_msg=case)
        np.testing.assert_array_equal(np.asarray(out.accepted[0, 1]), accepted, err_msg=case)
        assert float(out.tested[1].sum()) == 0, case  # row 1 has no match: nothing counted
    # a plain round (no outcome) writes the tokens and leaves the counts alone
    plain = drafter.commit(None, new, None, jnp.asarray([[6], [9]]), starts, jnp.asarray([1, 1]))
    np.testing.assert_array_equal(np.asarray(plain.tested), np.asarray(new.tested))
    # the confidence of the next "5 6"-match proposal: the prior mean worth s observations, moved by the counts
    from dspark_jax.drafters.ngram import lookup_confidence
    prior = jnp.asarray([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    conf = lookup_confidence(new, jnp.asarray([2, 0]), 4, prior, 2.0)
    np.testing.assert_allclose(np.asarray(conf), [[(1 + 1.0) / 3, (1 + 1.2) / 3, (0 + 1.4) / 3, 1.6 / 2],
                                                  [0, 0, 0, 0]], rtol=1e-6)


def test_lookup_prior_per_sampling_temperature(tmp_path, monkeypatch):
    """Each request's lookup confidence starts from the prior set measured nearest to its sampling temperature,
    and a per-request prior [B, n_max, G] feeds `lookup_confidence` row by row."""
    import json

    from dspark_jax.drafters import ngram
    def table(base):  # n_max 2: rows for n = 1, 2; three slots
        return {"2": {"mean": [[base, base + 0.1, base + 0.2], [base + 0.3, base + 0.4, base + 0.5]]}}
    path = tmp_path / "prior.json"
    path.write_text(json.dumps({"sets": [{"temperature": 1.0, "tables": table(0.1)},
                                         {"temperature": 0.0, "tables": table(0.5)}]}))
    monkeypatch.setattr(ngram, "PRIOR_FILE", path)
    ngram.prior_means.cache_clear()
    try:
        temperatures, means = ngram.prior_means(2, 3)
        assert temperatures == (0.0, 1.0)  # ascending, whatever the file's order
        prior = np.asarray(ngram.request_prior(2, 3, jnp.asarray([0.0, 0.3, 0.8, 1.5])))
        np.testing.assert_allclose(prior[:, 1, 0], [0.8, 0.8, 0.4, 0.4], rtol=1e-6)
        state = ngram.NgramState(tokens=jnp.zeros((2, 8), jnp.int32), tested=jnp.zeros((2, 2, 3)),
                                 accepted=jnp.zeros((2, 2, 3)), previous=jnp.full((2,), -1), streak=jnp.zeros((2,)),
                                 prompt_len=jnp.zeros((2,), jnp.int32))
        conf = ngram.lookup_confidence(state, jnp.asarray([2, 1]), 3, jnp.asarray(prior[[0, 3]]), 4.0)
        np.testing.assert_allclose(np.asarray(conf), [[0.8, 0.9, 1.0], [0.1, 0.2, 0.3]], rtol=1e-6)
    finally:
        ngram.prior_means.cache_clear()


def test_confidence_learns_online_in_the_loop():
    """On a prompt that loops, lookup drafts are accepted and their count estimate rises above the prior (the
    estimate alone, `calibrated=False`; the default calibration is tested against a reference below)."""
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _ngram(cfg, 3, calibrated=False)
    tokens, lens = _batch([[5, 6, 7, 5, 6, 7, 5, 6]])
    spec = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(0), SamplingParams.create(1),
                                jnp.float32(0.0), max_new_tokens=24, stop_ids=())
    r = int(spec.rounds[0])
    conf, flags = np.asarray(spec.confidence[0, :r]), np.asarray(spec.accept_flags[0, :r])
    drafted = np.asarray(spec.proposed[0, :r]) > 0
    assert drafted.any()
    first = np.flatnonzero(drafted)[0]
    from dspark_jax.drafters.ngram import prior_means
    temperatures, means = prior_means(3, 3)
    prior = np.asarray(means[temperatures.index(0.0)])  # greedy decoding: the set measured at T = 0
    assert any(np.allclose(conf[first], prior[n], atol=1e-6) for n in range(3))  # the prior, before any evidence
    rows = [n for n in range(3) if np.allclose(conf[first], prior[n], atol=1e-6)]
    if flags[drafted, 0].mean() > 0.9:  # accepted: later estimates move up from the prior
        assert conf[drafted][-1, 0] > prior[rows[0], 0]


def test_calibrated_confidence_in_the_loop_equals_the_plain_python_reference():
    """The loop's lookup confidences at T = 0 equal a plain-NumPy reference: the request's state replayed over its
    greedy output (`lookup_simulation.lookup_records`: counts, previous round's accepted drafts, streak, the match's
    period and whether it lies in the output) and the shipped calibration's logistic with its features written out
    here, round by round."""
    from dspark_jax.drafters.ngram import calibration_weights, prior_means
    from dspark_jax.evaluation.lookup_simulation import lookup_records
    gamma = 4
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _ngram(cfg, gamma, calibrated=True)
    weights = calibration_weights(3, 4.0)
    temperatures, means = prior_means(3, gamma)
    assert weights is not None and not np.isnan(weights[temperatures.index(0.0)][0])  # the shipped T = 0 fit
    w = np.asarray(weights[temperatures.index(0.0)])
    prior = np.asarray(means[temperatures.index(0.0)])
    seen_previous, seen_streak, seen_source, seen_past = set(), set(), set(), set()
    for prompt in REPETITIVE:
        tokens, lens = _batch([prompt])
        spec = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(0), SamplingParams.create(1),
                                    jnp.float32(0.0), max_new_tokens=24, stop_ids=())
        r = int(spec.rounds[0])
        drafted = np.asarray(spec.proposed[0, :r]) > 0
        conf = np.asarray(spec.confidence[0, :r])[drafted]
        records = list(lookup_records(prompt, [int(t) for t in spec.tokens[0]], prior, 4.0, 3, 1, gamma))
        assert len(records) == len(conf)
        k = np.arange(gamma)
        for rec, got in zip(records, conf):
            c = np.clip(rec.count_confidence, 1e-4, 1 - 1e-4)
            features = np.stack([np.ones(gamma), np.log(c / (1 - c)), np.full(gamma, rec.n == 1),
                                 np.full(gamma, rec.n == 2), np.log1p(k), np.full(gamma, rec.previous < 0),
                                 np.full(gamma, rec.previous == 0), np.full(gamma, np.log1p(max(rec.previous, 0))),
                                 np.full(gamma, np.log1p(rec.streak)), np.full(gamma, rec.in_output),
                                 np.full(gamma, np.log1p(rec.period)), np.full(gamma, rec.period <= 15),
                                 k >= rec.period, np.log1p(np.maximum(k - rec.period + 1, 0))], axis=1)
            np.testing.assert_allclose(got, 1 / (1 + np.exp(-features @ w)), rtol=1e-4, atol=1e-6)
            seen_previous.add(min(rec.previous, 1))
            seen_streak.add(min(rec.streak, 2))
            seen_source.add(rec.in_output)
            seen_past.add(bool(rec.period < gamma))
    # every branch of the state was exercised: the match in the prompt and in the output, loops shorter than the draft
    assert seen_previous == {-1, 0, 1} and seen_streak == {0, 1, 2}
    assert seen_source == {False, True} and seen_past == {False, True}


def test_lookup_round_details_name_the_match_source_by_hand():
    """Each simulated round's match source, worked out by hand on prompt [1, 2, 3, 4] and output [9, 2, 3, 5, 6, 5, 6,
    5, 6] (γ 4): token 2 matches the prompt 4 tokens back (drafts 3, 4, …: one accepted), later token 5 matches the
    output 2 tokens back (a loop: drafts 6, 5, 6 all accepted, cut where the output ends)."""
    from dspark_jax.evaluation.lookup_simulation import LookupRound, lookup_records, lookup_round_details, match_source
    prompt, output = [1, 2, 3, 4], [9, 2, 3, 5, 6, 5, 6, 5, 6]
    assert match_source(prompt + output[:2], 3, 1) == (1, 1) and match_source([1, 2, 3], 3, 1) == (0, -1)
    assert list(lookup_round_details(prompt, output, 3, 1, 4)) == [
        LookupRound(0, 0, 0, 1, 0, False), LookupRound(1, 1, 4, 2, 4, False), LookupRound(0, 0, 0, 1, 0, False),
        LookupRound(0, 0, 0, 1, 0, False), LookupRound(1, 3, 3, 3, 2, True)]
    assert [r[:4] for r in lookup_round_details(prompt, output, 3, 1, 4)] == list(lookup_rounds(prompt, output, 3, 1, 4))
    records = list(lookup_records(prompt, output, np.full((3, 4), 0.5), 4.0, 3, 1, 4))
    assert [(r.period, r.in_output, r.accepted, r.room) for r in records] == [(4, False, 1, 4), (2, True, 3, 3)]


def test_commit_tracks_the_previous_round_and_the_streak():
    """previous: drafts of the lookup's proposal known accepted in the last round with a match (cut at the committed
    count); streak: such rounds in a row with one accepted; a round without a match or a plain round keeps both."""
    from dspark_jax.drafters.base import RoundOutcome
    drafter = NgramDrafter(NgramConfig(block_size=4, n_max=2), 50)
    state = drafter.init_state(2, 12)
    state = drafter.prefill(None, state, None, jnp.asarray([[5, 6, 7, 5, 0, 0], [1, 2, 3, 4, 8, 0]]),
                            jnp.asarray([4, 5]))
    assert np.asarray(state.previous).tolist() == [-1, -1] and np.asarray(state.streak).tolist() == [0, 0]
    starts = jnp.asarray([4, 5])

    def commit(state, verified, count, committed):
        return drafter.commit(None, state, None, jnp.asarray(verified), starts, jnp.asarray(count),
                              RoundOutcome(jnp.asarray([4, 0]), jnp.asarray(committed, jnp.int32)))

    # row 0: anchor 6 at position 4 -> "5 6" matched, proposal 7 5 6 7; 7 and 5 accepted, then 9. Row 1: no match
    new = commit(state, [[6, 7, 5, 6, 7], [9, 0, 0, 0, 0]], [3, 1], [[7, 5, 9, 0, 0], [3, 0, 0, 0, 0]])
    assert np.asarray(new.previous).tolist() == [2, -1] and np.asarray(new.streak).tolist() == [1, 0]
    # the same round with the first draft rejected: previous 0, the streak broken
    rejected = commit(new, [[6, 7, 5, 6, 7], [9, 0, 0, 0, 0]], [1, 1], [[8, 0, 0, 0, 0], [3, 0, 0, 0, 0]])
    assert np.asarray(rejected.previous).tolist() == [0, -1] and np.asarray(rejected.streak).tolist() == [0, 0]
    # all four agree but the round was cut at count 2: two drafts known accepted; the streak goes on
    cut = commit(new, [[6, 7, 5, 6, 7], [9, 0, 0, 0, 0]], [2, 1], [[7, 5, 6, 7, 1], [3, 0, 0, 0, 0]])
    assert np.asarray(cut.previous).tolist() == [2, -1] and np.asarray(cut.streak).tolist() == [2, 0]
    plain = drafter.commit(None, cut, None, jnp.asarray([[6], [9]]), starts, jnp.asarray([1, 1]))
    assert np.asarray(plain.previous).tolist() == [2, -1] and np.asarray(plain.streak).tolist() == [2, 0]


# ---- hybrid: a trained drafter + lookup ------------------------------------------------------------

def _hybrid(cfg, gamma, reduced=False, **options):
    from dspark_jax.drafters.hybrid import HybridDrafter
    from tests.decoding.test_speculative import make_drafter
    dg, ds = make_drafter("dspark", cfg, gamma, reduced)
    lg, ls = _ngram(cfg, gamma, calibrated=options.pop("calibrated", False))
    return nnx.split(HybridDrafter(nnx.merge(dg, ds), nnx.merge(lg, ls), **options))


@pytest.mark.parametrize("gamma,reduced,threshold,skip_model_at,model_draft_length", [
    (3, False, 0.0, 1.0, None), (4, True, 0.3, float("inf"), None), (3, False, 0.0, 0.2, None),
    (4, False, 0.0, float("inf"), 2)])
def test_greedy_hybrid_equals_greedy_plain(gamma, reduced, threshold, skip_model_at, model_draft_length):
    tg, ts, cfg = make_target("gemma3")
    hg, hs = _hybrid(cfg, gamma, reduced, skip_model_at=skip_model_at, model_draft_length=model_draft_length)
    greedy_plain_and_speculative(tg, ts, hg, hs, REPETITIVE, 20, threshold)


def test_hybrid_model_drafts_only_its_draft_length():
    """model_draft_length 2 in a block of 4: the model's forward runs a 2-token block, its rows say 2 drafted with
    confidence 0 and zero p_draft past them, the lookup keeps all 4, and a round the model has not run yet is
    predicted to verify 2 of its drafts."""
    from dspark_jax.decoding.autoregressive import prefill
    from dspark_jax.decoding.verification import concat_taps
    from dspark_jax.drafters.hybrid import HybridDrafter
    tg, ts, cfg = make_target("gemma3")
    target = nnx.merge(tg, ts)
    hybrid = nnx.merge(*_hybrid(cfg, 4, skip_model_at=float("inf"), model_draft_length=2))
    assert (hybrid.config.block_size, hybrid.model.config.block_size, hybrid.lookup.config.block_size) == (4, 2, 4)
    prompts = jnp.asarray([list(range(1, 9)), list(range(11, 19))], jnp.int32)  # no repeat: the lookup has no match
    lens = jnp.asarray([8, 8], jnp.int32)
    state = hybrid.init_state(2, 32)
    _, out = prefill(target, prompts, lens, 32, tap_layers=hybrid.config.target_layer_ids)
    state = hybrid.prefill(target, state, concat_taps(out.taps), prompts, lens)
    head = hybrid.head_matrix(target)
    anchor = jnp.asarray([9, 19], jnp.int32)
    prop = HybridDrafter.propose(hybrid, target, state, anchor, lens, jax.random.key(0),
                                 SamplingParams.create(2, 1.0), FilterMode(), head)
    assert prop.tokens.shape == (2, 4) and prop.p_draft.shape[:2] == (2, 4)
    assert not np.asarray(prop.deterministic).any()  # both rows take the model's draft
    np.testing.assert_array_equal(np.asarray(prop.num_drafted), [2, 2])
    np.testing.assert_array_equal(np.asarray(prop.confidence)[:, 2:], 0.0)
    np.testing.assert_array_equal(np.asarray(prop.p_draft)[:, 2:], 0.0)
    np.testing.assert_array_equal(np.asarray(prop.model_confidence)[:, 2:], 0.0)
    assert (np.asarray(prop.model_confidence)[:, :2] > 0).all()
    conf, drafted = hybrid.predicted_rows(state, dataclasses.replace(prop, confidence=jnp.zeros((2, 4)),
                                                                     length=jnp.zeros(2, jnp.int32)),
                                          SamplingParams.create(2, 1.0))
    np.testing.assert_array_equal(np.asarray(drafted), [2, 2])  # never ran: 1 at its two positions, 0 past them
    np.testing.assert_array_equal(np.asarray(conf), [[1, 1, 0, 0], [1, 1, 0, 0]])
    shorter = nnx.merge(*nnx.split(hybrid))
    shorter.set_block_size(1)
    assert (shorter.config.block_size, shorter.model.config.block_size) == (1, 1)
    shorter.set_block_size(4)  # back up to the block the model was loaded with
    assert (shorter.config.block_size, shorter.model.config.block_size) == (4, 2)
    with pytest.raises(ValueError, match="gamma must be in"):
        shorter.set_block_size(5)
    with pytest.raises(ValueError, match="model_draft_length must be >= 1"):
        _hybrid(cfg, 4, model_draft_length=0)


def test_hybrid_proposes_the_draft_expected_to_be_accepted_further():
    from dspark_jax.drafters.base import Proposal
    from dspark_jax.drafters.hybrid import HybridDrafter
    tg, ts, cfg = make_target("gemma3")
    hybrid = nnx.merge(*_hybrid(cfg, 3))
    target = nnx.merge(tg, ts)
    lens = jnp.asarray([5, 5], jnp.int32)
    # model confidences: row 0 low, row 1 high; lookup: row 0 matches (confidence 0.5 prior), row 1 none
    model = Proposal(tokens=jnp.full((2, 3), 9), draft_index=jnp.full((2, 3), 9), p_draft=jnp.zeros((2, 3, 4)),
                     confidence=jnp.asarray([[0.2, 0.1, 0.1], [0.9, 0.9, 0.9]]), confidence_logits=jnp.zeros((2, 3)))
    lookup = Proposal(tokens=jnp.full((2, 3), 7), draft_index=jnp.full((2, 3), 7), p_draft=None,
                      confidence=jnp.asarray([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]]), confidence_logits=jnp.zeros((2, 3)),
                      length=jnp.asarray([3, 0]))
    hybrid.model.propose = lambda *a, **k: model
    hybrid.lookup.propose = lambda *a, **k: lookup
    from dspark_jax.drafters.hybrid import HybridState
    out = HybridDrafter.propose(hybrid, target, HybridState(None, None), jnp.zeros(2, jnp.int32), lens, None,
                                SamplingParams.create(2), None, None)
    np.testing.assert_array_equal(np.asarray(out.deterministic), [True, False])
    np.testing.assert_array_equal(np.asarray(out.tokens), [[7, 7, 7], [9, 9, 9]])
    np.testing.assert_array_equal(np.asarray(out.num_drafted), [3, 3])
    np.testing.assert_allclose(np.asarray(out.expected_accept_length), [0.5 + 0.25 + 0.125, 0.9 + 0.81 + 0.729],
                               rtol=1e-6)


def test_hybrid_scores_sampled_model_drafts_by_their_first_confidence_and_earlier_rounds():
    """At T > 0 the model's c_2.. depend on its sampled x_1.. (Markov head): the choice reads this round's c_1 and,
    past it, the request's predicted confidences from earlier rounds (or c_1 again without a record), so whether
    x_1 is verified never depends on x_1 (DSpark Appendix A); at T = 0 every c_k counts."""
    from dspark_jax.drafters.base import Proposal
    from dspark_jax.drafters.hybrid import HybridDrafter, HybridState
    tg, ts, cfg = make_target("gemma3")
    target = nnx.merge(tg, ts)
    hybrid = nnx.merge(*_hybrid(cfg, 3, skip_model_at=float("inf")))  # the choice itself: never skip the model

    def model(later):  # c_1 = 0.55 whatever was drawn; c_2, c_3 = later (as if they followed the drawn x_1)
        return Proposal(tokens=jnp.full((1, 3), 9), draft_index=jnp.full((1, 3), 9), p_draft=jnp.ones((1, 3, 4)),
                        confidence=jnp.asarray([[0.55, later, later]]), confidence_logits=jnp.zeros((1, 3)))
    lookup = Proposal(tokens=jnp.full((1, 3), 7), draft_index=jnp.full((1, 3), 7), p_draft=None,
                      confidence=jnp.full((1, 3), 0.6), confidence_logits=jnp.zeros((1, 3)),
                      length=jnp.asarray([3]))  # expects 0.6 + 0.36 + 0.216 = 1.18
    hybrid.lookup.propose = lambda *a, **k: lookup

    def lookup_chosen(temperature, later):
        hybrid.model.propose = lambda *a, **k: model(later)
        out = HybridDrafter.propose(hybrid, target, HybridState(None, None), jnp.zeros(1, jnp.int32),
                                    jnp.asarray([5]), None, SamplingParams.create(1, temperature), None, None)
        return bool(out.deterministic[0])

    assert not lookup_chosen(0.0, 1.0)  # greedy: 0.55 · 3 = 1.65 beats 1.18
    assert lookup_chosen(0.0, 0.1)
    assert lookup_chosen(1.0, 1.0) and lookup_chosen(1.0, 0.1)  # sampled: 0.55 + 0.30 + 0.17 = 1.02 either way

    def lookup_chosen_after(temperature, later, mean):  # the model ran in 2 earlier rounds, its head's mean `mean`
        hybrid.model.propose = lambda *a, **k: model(later)
        state = HybridState(None, None, model_tested=jnp.zeros((1, 3)), model_accepted=jnp.zeros((1, 3)),
                            model_confidence_sum=2 * jnp.asarray([mean]), model_rounds=jnp.asarray([2.0]))
        out = HybridDrafter.propose(hybrid, target, state, jnp.zeros(1, jnp.int32), jnp.asarray([5]), None,
                                    SamplingParams.create(1, temperature), None, None)
        return bool(out.deterministic[0])

    # sampled: 0.55 · (1 + 0.9 + 0.81) = 1.49 beats 1.18 whatever this round's c_2.. say; 0.55 · (1 + 0.2 + 0.04)
    # = 0.68 loses to it — the earlier rounds' c_2, c_3, not this round's
    assert not lookup_chosen_after(1.0, 0.1, [0.3, 0.9, 0.9]) and not lookup_chosen_after(1.0, 1.0, [0.3, 0.9, 0.9])
    assert lookup_chosen_after(1.0, 1.0, [0.3, 0.2, 0.2]) and lookup_chosen_after(1.0, 0.1, [0.3, 0.2, 0.2])
    assert not lookup_chosen_after(0.0, 1.0, [0.3, 0.2, 0.2])  # greedy: this round's c_k (0.55 · 3 = 1.65)


def test_hybrid_skips_the_model_when_every_lookup_draft_is_expected_to_go_far():
    """A request whose lookup draft expects >= skip_model_at accepted tokens takes it, whatever the model's draft
    (so its choice does not depend on its batch companions); where every request does, the model's forward is
    skipped. Below the threshold, or with inf, the per-request choice by expected accepted length."""
    from dspark_jax.drafters.base import Proposal
    from dspark_jax.drafters.hybrid import HybridDrafter, HybridState
    tg, ts, cfg = make_target("gemma3")
    target = nnx.merge(tg, ts)
    lens = jnp.asarray([5, 5], jnp.int32)
    model = Proposal(tokens=jnp.full((2, 3), 9), draft_index=jnp.full((2, 3), 9), p_draft=jnp.ones((2, 3, 4)),
                     confidence=jnp.full((2, 3), 0.9), confidence_logits=jnp.ones((2, 3)))  # expects 2.44
    lookup = Proposal(tokens=jnp.full((2, 3), 7), draft_index=jnp.full((2, 3), 7), p_draft=None,
                      confidence=jnp.asarray([[0.9, 0.5, 0.5], [0.5, 0.5, 0.5]]), confidence_logits=jnp.zeros((2, 3)),
                      length=jnp.asarray([3, 3]))  # expects 1.58 and 0.875

    def propose(skip_model_at):
        hybrid = nnx.merge(*_hybrid(cfg, 3, skip_model_at=skip_model_at))
        hybrid.model.propose = lambda *a, **k: model
        hybrid.lookup.propose = lambda *a, **k: lookup
        return jax.jit(lambda: HybridDrafter.propose(hybrid, target, HybridState(None, None), jnp.zeros(2, jnp.int32),
                                                     lens, None, SamplingParams.create(2), None, None))()

    for skip_model_at, lookup_rows in ((0.0, [True, True]), (0.8, [True, True]), (1.0, [True, False]),
                                       (1.6, [False, False]), (float("inf"), [False, False])):
        out = propose(skip_model_at)
        np.testing.assert_array_equal(np.asarray(out.deterministic), lookup_rows)
        # the round skips the model's forward where every row takes the lookup's draft (0: always)
        np.testing.assert_array_equal(np.asarray(out.model_skipped), [skip_model_at <= 0.8] * 2)
        np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], np.where(lookup_rows, 7, 9))
        assert out.p_draft.shape == (2, 3, 4)
    # a skipped model stays unchosen whatever its record: its zero confidences are not moved by it
    hybrid = nnx.merge(*_hybrid(cfg, 3, skip_model_at=0.8))
    hybrid.model.propose = lambda *a, **k: model
    hybrid.lookup.propose = lambda *a, **k: lookup
    perfect = HybridState(None, None, model_tested=jnp.full((2, 3), 100.0), model_accepted=jnp.full((2, 3), 100.0))
    out = jax.jit(lambda: HybridDrafter.propose(hybrid, target, perfect, jnp.zeros(2, jnp.int32), lens, None,
                                                SamplingParams.create(2), None, None))()
    np.testing.assert_array_equal(np.asarray(out.deterministic), [True, True])
    assert nnx.merge(*_hybrid(cfg, 5)).model_skip_threshold == 1.0  # the default: one expected token, whatever γ
    with pytest.raises(ValueError, match="skip_model_at"):
        _hybrid(cfg, 3, skip_model_at=-1.0)


def test_hybrid_model_record_counts_only_rows_whose_model_draft_was_verified():
    """commit: row 0 verified the model's 3 drafts and accepted 1 (count 2: one accepted + the next token);
    row 1 verified the lookup's; row 2 the model's, all 3 accepted (count 4). Records (tested, accepted) per
    position as `acceptance_counts`; plain rounds (no outcome) leave it alone."""
    from dspark_jax.drafters.base import RoundOutcome
    from dspark_jax.drafters.hybrid import HybridDrafter
    tg, ts, cfg = make_target("gemma3")
    hybrid = nnx.merge(*_hybrid(cfg, 3))
    hybrid.model.commit = lambda *a, **k: "model state"
    hybrid.lookup.commit = lambda *a, **k: "lookup state"
    state = hybrid.init_state(3, 16)
    verified, start = jnp.zeros((3, 4), jnp.int32), jnp.asarray([5, 5, 5])
    out = HybridDrafter.commit(hybrid, None, state, None, verified, start, jnp.asarray([2, 4, 4]),
                               RoundOutcome(jnp.asarray([3, 3, 3]), jnp.zeros((3, 4), jnp.int32),
                                            jnp.asarray([False, True, False])))
    assert (out.model, out.lookup) == ("model state", "lookup state")
    np.testing.assert_array_equal(np.asarray(out.model_tested), [[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(out.model_accepted), [[1, 0, 0], [0, 0, 0], [1, 1, 1]])
    plain = HybridDrafter.commit(hybrid, None, out, None, verified[:, :1], start, jnp.asarray([1, 1, 1]))
    np.testing.assert_array_equal(np.asarray(plain.model_tested), np.asarray(out.model_tested))


def test_hybrid_corrects_the_model_confidence_by_its_record():
    """c_k → (accepted_k + s·c_k) / (tested_k + s), s = model_prior_strength = 4. Row 0's model drafts failed at
    position 1 eight times: its head's 0.9 becomes 0.3 there and the lookup's draft is chosen; row 1's record
    (2 of 2 accepted at position 1) raises its c_1 and the model's draft stays chosen, with corrected confidences."""
    from dspark_jax.drafters.base import Proposal
    from dspark_jax.drafters.hybrid import HybridDrafter, HybridState
    tg, ts, cfg = make_target("gemma3")
    target = nnx.merge(tg, ts)
    hybrid = nnx.merge(*_hybrid(cfg, 3, skip_model_at=float("inf")))  # the choice itself: never skip the model
    model = Proposal(tokens=jnp.full((2, 3), 9), draft_index=jnp.full((2, 3), 9), p_draft=jnp.ones((2, 3, 4)),
                     confidence=jnp.full((2, 3), 0.9), confidence_logits=jnp.ones((2, 3)))  # expects 2.44
    lookup = Proposal(tokens=jnp.full((2, 3), 7), draft_index=jnp.full((2, 3), 7), p_draft=None,
                      confidence=jnp.full((2, 3), 0.6), confidence_logits=jnp.zeros((2, 3)),
                      length=jnp.asarray([3, 3]))  # expects 1.176
    hybrid.model.propose = lambda *a, **k: model
    hybrid.lookup.propose = lambda *a, **k: lookup
    record = HybridState(None, None, model_tested=jnp.asarray([[8.0, 0, 0], [2, 0, 0]]),
                         model_accepted=jnp.asarray([[0.0, 0, 0], [2, 0, 0]]))
    out = HybridDrafter.propose(hybrid, target, record, jnp.zeros(2, jnp.int32), jnp.asarray([5, 5]), None,
                                SamplingParams.create(2), None, None)
    np.testing.assert_array_equal(np.asarray(out.deterministic), [True, False])
    np.testing.assert_allclose(np.asarray(out.confidence), [[0.6, 0.6, 0.6], [(2 + 3.6) / 6, 0.9, 0.9]], rtol=1e-6)
    no_record = HybridDrafter.propose(hybrid, target, HybridState(None, None), jnp.zeros(2, jnp.int32),
                                      jnp.asarray([5, 5]), None, SamplingParams.create(2), None, None)
    np.testing.assert_array_equal(np.asarray(no_record.deterministic), [False, False])
    with pytest.raises(ValueError, match="model_prior_strength"):
        from dspark_jax.drafters.hybrid import HybridDrafter as H
        H(hybrid.model, hybrid.lookup, model_prior_strength=0.0)


def test_hybrid_record_follows_the_verified_source_in_the_loop():
    """One drafted round of the jitted loop's round code: the rows that verified the model's draft (the
    proposal's non-deterministic rows) gain a test at position 1 and an acceptance per accepted draft; lookup
    rows gain nothing."""
    from dspark_jax.decoding.speculative import _rounds
    from dspark_jax.sampling.keys import DRAFT, position_keys
    tg, ts, cfg = make_target("gemma3")
    hg, hs = _hybrid(cfg, 3)
    prompts = jnp.asarray([[5, 6, 7, 5, 6, 7, 5, 6], [3, 9, 14, 22, 0, 0, 0, 0]], jnp.int32)
    lens = jnp.asarray([8, 4], jnp.int32)
    rounds = _rounds(tg, ts, hg, hs, SamplingParams.create(2), jnp.float32(0.0), batch=2, max_new_tokens=12,
                     stop_ids=(), mode=FilterMode(), verify_buckets=None, verify_costs=None, plain_cost=None)
    model_propose, lookup_propose = rounds.drafter.model.propose, rounds.drafter.lookup.propose

    def unsure_in_row_0(*args, **kwargs):  # the model's head expects little in row 0 ...
        prop = model_propose(*args, **kwargs)
        return dataclasses.replace(prop, confidence=prop.confidence * jnp.asarray([[0.1], [1.0]]))

    def sure_in_row_0(*args, **kwargs):  # ... and the lookup proposes there, with confidence 0.9
        prop = lookup_propose(*args, **kwargs)
        return dataclasses.replace(prop, length=prop.num_drafted.at[0].set(3),
                                   confidence=prop.confidence.at[0].set(0.9))
    rounds.drafter.model.propose, rounds.drafter.lookup.propose = unsure_in_row_0, sure_in_row_0
    c = rounds.start(prompts, lens, jax.random.key(0), pad_id=0)
    prop = rounds.drafter.propose(rounds.target, c.drafter_state, c.anchor, c.start,
                                  position_keys(c.keys, c.start, DRAFT), rounds.params, rounds.mode, rounds.head)
    after = rounds._apply(c, rounds.drafted(c))
    model_rows = ~np.asarray(prop.deterministic)
    assert model_rows.any() and not model_rows.all()  # both sources in one round
    accepted = np.asarray(after.num_generated - c.num_generated) - 1
    tested, acc = np.asarray(after.drafter_state.model_tested), np.asarray(after.drafter_state.model_accepted)
    k = np.arange(3)[None]
    np.testing.assert_array_equal(tested, model_rows[:, None] * (k <= accepted[:, None]))
    np.testing.assert_array_equal(acc, model_rows[:, None] * (k < accepted[:, None]))


@pytest.mark.parametrize("top_k,top_p,skip_model_at,model_draft_length", [(3, 0.8, 1.0, None), (0, 1.0, 0.3, None),
                                                                       (0, 1.0, 0.3, 1)])
def test_hybrid_temperature_one_is_lossless(top_k, top_p, skip_model_at, model_draft_length):
    from tests.decoding.test_speculative import V_SMALL
    tg, ts, cfg = make_target("gemma3", vocab_size=V_SMALL)
    hg, hs = _hybrid(cfg, 2, skip_model_at=skip_model_at, model_draft_length=model_draft_length)
    params = SamplingParams.create(1, 1.0, top_k, top_p)
    mode = FilterMode.for_params(top_k, top_p)
    prompt = [1, 2, 1, 2, 1]
    seqs, prob = exact_joint(tg, ts, prompt, params, mode)
    codes, sp = sampled_joint(tg, ts, hg, hs, prompt, params, mode)
    assert 0.1 < np.asarray(sp.accepted).sum(1).mean() < 2
    assert chi_square_pvalue(codes, prob) > 1e-3


# ---- the serving engine ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind,policy", [("ngram", "scheduler"), ("hybrid", "scheduler_async")])
def test_engine_with_lookup_gives_plain_greedy_output(kind, policy):
    from dspark_jax.drafters.factory import hybrid_drafter, load_drafter, random_drafter
    from dspark_jax.serving.engine import Engine, EngineConfig
    from dspark_jax.serving.requests import Request
    from dspark_jax.serving.cost_table import CostTable
    from dspark_jax.testing.compiles import counting_compiles
    from dspark_jax.testing.tiny_target import make_tiny_target, plain_greedy
    target = make_tiny_target()
    drafter = (load_drafter("ngram", target, gamma=3) if kind == "ngram"
               else hybrid_drafter(random_drafter(target, "dspark", gamma=3, num_layers=1), target))
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9, 10, 11, 12], [20, 21, 20, 21], [3, 4, 5], [40, 41, 42, 40, 41], [7, 8]]
    expected = [plain_greedy(target, p, 14) for p in prompts]
    engine = Engine(target, drafter, EngineConfig(slots=4, max_len=64, policy=policy, gamma=3),
                    cost_table=CostTable((4, 8, 16), (100.0, 90.0, 80.0)))
    ids = []

    def serve():
        ids.extend(engine.submit(Request(p, max_new_tokens=14)) for p in prompts)
        engine.run_until_idle()
    compiles = counting_compiles(serve)
    assert [engine.tokens(i) for i in ids] == expected
    assert sum(engine.stats(i).accepted_draft for i in ids) > 0
    assert compiles == []  # every bucket compiled at engine start: nothing compiles while serving, from the first request


# ---- a DSpark drafter with lookup inputs -----------------------------------------------------------

def _lookup_input_drafter(cfg, gamma, reduced):
    from dspark_jax.drafters.config import make_drafter_config
    from dspark_jax.drafters.dspark import DSparkDrafter
    vocab_ids = np.arange(0, cfg.vocab_size, 2)[:40] if reduced else None
    dc = make_drafter_config("dspark", cfg, block_size=gamma, num_layers=1, markov_rank=8,
                             draft_vocab_size=len(vocab_ids) if reduced else None, lookup_inputs=3)
    module = DSparkDrafter(dc, cfg, rngs=nnx.Rngs(1), draft_vocab_ids=vocab_ids)
    module.lookup_fc.value = 0.5 * jax.random.normal(jax.random.key(2), module.lookup_fc.value.shape)  # not a no-op
    return module


@pytest.mark.parametrize("gamma,reduced", [(3, False), (5, True)])
def test_greedy_lookup_input_drafter_equals_greedy_plain_and_uses_the_lookup(gamma, reduced):
    tg, ts, cfg = make_target("gemma3")
    module = _lookup_input_drafter(cfg, gamma, reduced)
    greedy_plain_and_speculative(tg, ts, *nnx.split(module), REPETITIVE, 20)
    # the block reads the lookup: the proposal changes when the lookup's tokens do
    target = nnx.merge(tg, ts)
    tokens, lens = _batch(REPETITIVE)
    features = jnp.zeros((4, 16, len(module.config.target_layer_ids) * cfg.hidden_size))
    state = module.prefill(target, module.init_state(4, 40), features, tokens, lens)
    anchor = jnp.asarray([6, 17, 20, 3])
    hidden = module.backbone(target, anchor, lens, state)
    no_lookup = module.backbone(target, anchor, lens, state, lookup=jnp.full((4, gamma), module.config.mask_token_id))
    assert not np.allclose(np.asarray(hidden[0]), np.asarray(no_lookup[0]))  # row 0 loops: lookup matched


def test_drafter_specs():
    from dspark_jax.drafters.factory import check_drafter_spec, load_drafter, with_block_size
    from dspark_jax.testing.tiny_target import make_tiny_target
    target = make_tiny_target()
    for spec in ("ngram:n_max=4,n_min=2", "ngram:n_max=4:n_min=2"):
        d = load_drafter(spec, target, gamma=5)
        assert (d.config.n_max, d.config.n_min, d.config.block_size) == (4, 2, 5)
    assert with_block_size(load_drafter("ngram", target), 9).config.block_size == 9  # lookup: any length
    assert load_drafter("ngram", target).config.calibrated and not load_drafter("ngram:calibrated=0", target).config.calibrated
    assert load_drafter("ngram:calibrated=1", target).config.calibrated
    hybrid_count = load_drafter("random+ngram:calibrated=0", target, draft_vocab_size=None)
    assert not nnx.merge(hybrid_count.graphdef, hybrid_count.state).lookup.config.calibrated
    hybrid = load_drafter("random+ngram", target, draft_vocab_size=None)
    assert nnx.merge(hybrid.graphdef, hybrid.state).lookup.config.calibrated
    for bad, match in (("ngram:n_max=x", "integer"), ("ngram:size=3", "n_max=N"), ("ngram:n_max=1,n_min=2", "n_min"),
                       ("ngram:calibrated=yes", "0 or 1")):
        with pytest.raises(ValueError, match=match):
            load_drafter(bad, target)
    for bad in ("ngram+ngram", "default+lookup"):
        with pytest.raises(ValueError, match="hybrid"):
            check_drafter_spec(bad)
    with pytest.raises(FileNotFoundError, match="drafter not found"):
        check_drafter_spec("/nonexistent+ngram")
    hybrid = load_drafter("random+ngram:n_max=2", target, gamma=4, draft_vocab_size=None)
    assert hybrid.config.algorithm == "dspark+ngram" and hybrid.config.block_size == 4
    assert hybrid.config.skip_model_at == 1.0 and hybrid.source == "random:dspark+ngram:n_max=2"
    short = load_drafter("random+ngram:model_draft_length=2", target, gamma=4, draft_vocab_size=None)
    assert short.config.model_draft_length == 2 and short.source == "random:dspark+ngram:model_draft_length=2"
    assert nnx.merge(short.graphdef, short.state).model.config.block_size == 2
    assert with_block_size(short, 3).config.block_size == 3
    by_default = load_drafter("random+ngram", target, gamma=8, draft_vocab_size=None)  # the model drafts 6 of 8
    assert by_default.config.model_draft_length == 6 and by_default.source == "random:dspark+ngram"
    assert nnx.merge(by_default.graphdef, by_default.state).model.config.block_size == 6
    whole = load_drafter("random+ngram:model_draft_length=8", target, gamma=8, draft_vocab_size=None)
    assert nnx.merge(whole.graphdef, whole.state).model.config.block_size == 8
    from dspark_jax.drafters.factory import hybrid_drafter
    model = load_drafter("random", target, gamma=8, draft_vocab_size=None)
    unlimited = hybrid_drafter(model, target, model_draft_length=None)  # None: the whole block, said in the source
    assert unlimited.config.model_draft_length is None and unlimited.source.endswith(":model_draft_length=8")
    assert nnx.merge(unlimited.graphdef, unlimited.state).model.config.block_size == 8
    from dspark_jax.drafters.factory import with_model_draft_length
    longer = with_model_draft_length(short, None)
    assert longer.config.model_draft_length is None
    assert nnx.merge(longer.graphdef, longer.state).model.config.block_size == 4
    with pytest.raises(ValueError, match="hybrid drafter"):
        with_model_draft_length(load_drafter("ngram", target), 2)
    for bad in ("0", "2.5"):
        with pytest.raises(ValueError, match="model_draft_length is a whole number"):
            load_drafter(f"random+ngram:model_draft_length={bad}", target, gamma=4)
    tuned = load_drafter("random+ngram:n_max=2:skip_model_at=1.5:model_prior_strength=8", target, gamma=4)
    assert tuned.config.skip_model_at == 1.5 and tuned.config.model_prior_strength == 8
    assert nnx.merge(tuned.graphdef, tuned.state).lookup.config.n_max == 2
    assert tuned.source == "random:dspark+ngram:n_max=2:skip_model_at=1.5:model_prior_strength=8"
    with pytest.raises(ValueError, match="skip_model_at must be a number"):
        load_drafter("random+ngram:skip_model_at=x", target, gamma=4)
    with pytest.raises(ValueError, match="skip_model_at must be >= 0"):
        load_drafter("random+ngram:skip_model_at=-1", target, gamma=4)
    assert with_block_size(hybrid, 2).config.block_size == 2
    with pytest.raises(ValueError, match="gamma must be in"):
        with_block_size(hybrid, 5)


def test_hybrid_predicts_its_model_from_earlier_rounds_and_skips_a_forward_that_does_not_pay():
    """`price_model`: the loop's `model_pays` sees the lookup's rows and the rows a model round is predicted to
    verify — per request the mean of the model head's earlier confidences, corrected by its record (s = 4), 1 where
    the model never ran —; where it says no, the forward is skipped (every row takes the lookup's draft)."""
    from dspark_jax.drafters.base import Proposal
    from dspark_jax.drafters.hybrid import HybridDrafter, HybridState
    tg, ts, cfg = make_target("gemma3")
    target = nnx.merge(tg, ts)
    lens = jnp.asarray([5, 5], jnp.int32)
    model = Proposal(tokens=jnp.full((2, 3), 9), draft_index=jnp.full((2, 3), 9), p_draft=jnp.ones((2, 3, 4)),
                     confidence=jnp.full((2, 3), 0.9), confidence_logits=jnp.ones((2, 3)))
    lookup = Proposal(tokens=jnp.full((2, 3), 7), draft_index=jnp.full((2, 3), 7), p_draft=None,
                      confidence=jnp.asarray([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]]), confidence_logits=jnp.zeros((2, 3)),
                      length=jnp.asarray([3, 0]))  # row 0 expects 0.875 (< skip_model_at 1), row 1 nothing
    # row 0: two model rounds, head confidences summing to (1.2, 0.8, 0.4) → mean (0.6, 0.4, 0.2), record 4 of 4
    # tested at position 1 accepted → c_1 (4 + 4·0.6) / 8 = 0.8; row 1: the model never ran → predicted 1
    state = HybridState(None, None, model_tested=jnp.asarray([[4.0, 0, 0], [0, 0, 0]]),
                        model_accepted=jnp.asarray([[4.0, 0, 0], [0, 0, 0]]),
                        model_confidence_sum=jnp.asarray([[1.2, 0.8, 0.4], [0.0, 0.0, 0.0]]),
                        model_rounds=jnp.asarray([2.0, 0.0]))
    seen = {}

    def propose(pays, price_model=True, temperature=0.0):
        hybrid = nnx.merge(*_hybrid(cfg, 3, price_model=price_model))
        hybrid.model.propose = lambda *a, **k: model
        hybrid.lookup.propose = lambda *a, **k: lookup

        def model_pays(*rows):
            seen["rows"] = rows
            return jnp.asarray(pays)
        return HybridDrafter.propose(hybrid, target, state, jnp.zeros(2, jnp.int32), lens, None,
                                     SamplingParams.create(2, temperature), None, None, model_pays=model_pays)

    out = propose(True)
    assert not bool(out.model_skipped[0])
    np.testing.assert_array_equal(np.asarray(out.deterministic), [False, False])
    np.testing.assert_allclose(np.asarray(out.model_confidence), np.full((2, 3), 0.9))  # the head's, uncorrected
    lookup_conf, lookup_n, predicted, predicted_n = seen["rows"]
    np.testing.assert_allclose(np.asarray(lookup_conf), np.asarray(lookup.confidence))
    np.testing.assert_array_equal(np.asarray(lookup_n), [3, 0])
    # row 0's predicted model draft expects 0.8 + 0.32 + 0.064 = 1.18 > 0.875: the model's row is predicted
    np.testing.assert_allclose(np.asarray(predicted), [[0.8, 0.4, 0.2], [1.0, 1.0, 1.0]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(predicted_n), [3, 3])
    out = propose(False)
    assert np.asarray(out.model_skipped).all() and np.asarray(out.deterministic).all()
    np.testing.assert_array_equal(np.asarray(out.tokens), np.full((2, 3), 7))
    np.testing.assert_array_equal(np.asarray(out.model_confidence), np.zeros((2, 3)))
    assert not bool(propose(False, price_model=False).model_skipped[0])  # unpriced: the test is not asked
    propose(True, temperature=1.0)  # sampled rows: the prediction at every position, as `model_score` scores them
    np.testing.assert_allclose(np.asarray(seen["rows"][2]), [[0.8, 0.4, 0.2], [1.0, 1.0, 1.0]], rtol=1e-6)


def test_hybrid_learns_its_model_prediction_from_rounds_that_ran_the_model():
    """commit: the model head's confidences of the round (`RoundOutcome.model_confidence`) are summed per request
    where the model's forward ran and the request committed; a round that skipped the model adds nothing."""
    from dspark_jax.drafters.base import RoundOutcome
    from dspark_jax.drafters.hybrid import HybridDrafter
    tg, ts, cfg = make_target("gemma3")
    hybrid = nnx.merge(*_hybrid(cfg, 3))
    hybrid.model.commit = lambda *a, **k: "model state"
    hybrid.lookup.commit = lambda *a, **k: "lookup state"
    state = hybrid.init_state(3, 16)
    conf = jnp.asarray([[0.9, 0.8, 0.7], [0.5, 0.4, 0.3], [0.2, 0.1, 0.1]])
    verified, start = jnp.zeros((3, 4), jnp.int32), jnp.asarray([5, 5, 5])

    def commit(s, count, skipped):
        return HybridDrafter.commit(hybrid, None, s, None, verified, start, jnp.asarray(count),
                                    RoundOutcome(jnp.asarray([3, 3, 3]), jnp.zeros((3, 4), jnp.int32),
                                                 jnp.asarray([False, True, False]),
                                                 model_skipped=jnp.asarray([skipped] * 3), model_confidence=conf))
    once = commit(state, [2, 1, 0], False)  # row 2 finished (count 0): nothing to learn
    np.testing.assert_allclose(np.asarray(once.model_confidence_sum), np.asarray(conf) * [[1], [1], [0]])
    np.testing.assert_array_equal(np.asarray(once.model_rounds), [1, 1, 0])
    skipped = commit(once, [2, 1, 1], True)
    np.testing.assert_array_equal(np.asarray(skipped.model_rounds), [1, 1, 0])
    twice = commit(once, [2, 1, 1], False)
    np.testing.assert_array_equal(np.asarray(twice.model_rounds), [2, 2, 1])
    mean = np.asarray(conf) * [[1], [1], [1]]  # row 2: one round, its confidences; rows 0, 1: twice the same
    acc, tested = np.asarray(twice.model_accepted), np.asarray(twice.model_tested)
    np.testing.assert_allclose(np.asarray(hybrid.predicted_model_confidence(twice)), (acc + 4 * mean) / (tested + 4),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(hybrid.predicted_model_confidence(state)), np.ones((3, 3)))

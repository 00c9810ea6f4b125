"""Hardware-aware draft length of the jitted loop: the width choice on hand-made cost tables, the widths worth
compiling, and losslessness (greedy identity, chi-square at T = 1) when rounds verify at chosen widths."""
from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.decoding.draft_length import choose_width, covering_width, efficient_widths, expected_committed
from dspark_jax.sampling import FilterMode, SamplingParams
from tests.drafters.test_ngram import REPETITIVE, _ngram, greedy_plain_and_speculative
from tests.decoding.test_speculative import chi_square_pvalue, exact_joint, make_target, sampled_joint


def _brute_force_rate(conf, n, active, width, cost):
    """Expected committed tokens per unit cost at one width, written out request by request."""
    total = 0.0
    for b in range(conf.shape[0]):
        if not active[b]:
            continue
        survive, expected = 1.0, 1.0
        for j in range(min(n[b], width - 1)):
            survive *= conf[b, j]
            expected += survive
        total += expected
    return total / cost


@pytest.mark.parametrize("seed", range(6))
def test_choice_is_the_argmax_of_expected_tokens_per_cost(seed):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.2, 1.0, (3, 7)).astype(np.float32)
    n = rng.integers(0, 8, 3)
    active = np.array([True, True, seed % 2 == 0])
    widths = (1, 2, 4, 8)
    costs = tuple(np.cumsum(rng.uniform(0.1, 1.0, 4)))
    got = int(choose_width(jnp.asarray(conf), jnp.asarray(n), jnp.asarray(active), widths, costs))
    cover = next((i for i, w in enumerate(widths) if w >= n.max() + 1), len(widths) - 1)
    rates = [_brute_force_rate(conf, n, active, w, c) for w, c in zip(widths[:cover + 1], costs[:cover + 1])]
    assert got == int(np.argmax(rates))
    np.testing.assert_allclose(np.asarray(expected_committed(jnp.asarray(conf), jnp.asarray(n), jnp.asarray(active),
                                                             widths)),
                               [_brute_force_rate(conf, n, active, w, 1.0) for w in widths], rtol=1e-5)


def test_choice_on_a_hand_made_table():
    widths, costs = (1, 2, 4, 8), (1.0, 1.5, 1.9, 2.3)
    high = jnp.full((1, 7), 0.95)
    low = jnp.full((1, 7), 0.2)
    seven, yes = jnp.asarray([7]), jnp.asarray([True])
    # confident drafts: 1 + Σ 0.95^k over 7 = 6.6 tokens for 2.3 beats every narrower width
    assert int(choose_width(high, seven, yes, widths, costs)) == 3
    # unlikely drafts: a plain step (1 token / 1.0) beats 1.2 / 1.5, 1.25 / 1.9, 1.25 / 2.3
    assert int(choose_width(low, seven, yes, widths, costs)) == 0
    # never wider than what was proposed: 1 draft → width 2 at most
    assert int(choose_width(high, jnp.asarray([1]), yes, widths, costs)) == 1
    # without costs: the narrowest width holding every proposal
    assert int(choose_width(low, jnp.asarray([3]), yes, widths, None)) == 2
    assert int(covering_width(jnp.asarray([0, 0]), widths)) == 0
    assert int(covering_width(jnp.asarray([0, 9]), widths)) == 3
    # equal rates: the narrower width
    assert int(choose_width(jnp.full((1, 7), 1.0), seven, yes, (1, 2), (1.0, 2.0))) == 0


def test_widths_worth_compiling():
    widths = tuple(range(1, 13))
    costs = (1.0, 1.57, 1.88, 1.89, 2.16, 2.22, 2.3, 2.28, 2.3, 2.3, 2.3, 2.24)  # jagged, like XLA:CPU
    kept, kept_costs = efficient_widths(widths, costs, max_widths=12)
    assert kept == (1, 2, 3, 4, 5, 6, 12)  # 7..11 cost at least as much as 12
    assert kept_costs == (1.0, 1.57, 1.88, 1.89, 2.16, 2.22, 2.24)
    few, _ = efficient_widths(widths, costs, max_widths=4)
    assert few[0] == 1 and few[-1] == 12 and len(few) == 4
    assert efficient_widths((1,), (0.5,)) == ((1,), (0.5,))
    for bad in [((1, 2), (1.0,)), ((2, 3), (1.0, 2.0)), ((1, 1), (1.0, 1.0)), ((1, 2), (1.0, -1.0))]:
        with pytest.raises(ValueError):
            efficient_widths(*bad)


COSTS = dict(verify_widths=(1, 2, 4, 6), verify_costs=(1.0, 1.3, 1.6, 2.0))


@pytest.mark.parametrize("loop_options", [dict(verify_widths=(1, 3, 6)), COSTS])
def test_greedy_identity_at_chosen_widths(loop_options):
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _ngram(cfg, 5)
    _, spec = greedy_plain_and_speculative(tg, ts, dg, ds, REPETITIVE, 24, **loop_options)
    rounds, proposed = np.asarray(spec.rounds), np.asarray(spec.proposed)
    widths = loop_options["verify_widths"]
    for b in range(len(REPETITIVE)):
        assert set(proposed[b, :rounds[b]] + 1) <= set(widths)  # lookup proposes G or nothing
        assert np.asarray(spec.committed)[b, :rounds[b]].sum() == 23


def test_bad_widths_are_rejected():
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _ngram(cfg, 3)
    for options in [dict(verify_widths=(2, 4)), dict(verify_widths=(1, 8)), dict(verify_widths=(1, 2), verify_costs=(1.0,))]:
        with pytest.raises(ValueError, match="verify"):
            greedy_plain_and_speculative(tg, ts, dg, ds, REPETITIVE[:1], 4, **options)


def test_temperature_one_is_lossless_at_chosen_widths():
    from tests.decoding.test_speculative import V_SMALL
    tg, ts, cfg = make_target("gemma3", vocab_size=V_SMALL)
    dg, ds = _ngram(cfg, 2, n_max=2, n_min=1)
    params = SamplingParams.create(1, 1.0, 3, 0.8)
    mode = FilterMode.for_params(3, 0.8)
    prompt = [1, 2, 1, 2, 1]
    _, prob = exact_joint(tg, ts, prompt, params, mode)
    codes, sp = sampled_joint(tg, ts, dg, ds, prompt, params, mode, verify_widths=(1, 2, 3),
                              verify_costs=(1.0, 1.2, 1.9))
    assert set(np.unique(np.asarray(sp.proposed)[np.asarray(sp.rounds)[:, None] > np.arange(sp.proposed.shape[1])]))\
        <= {0, 1, 2}
    assert chi_square_pvalue(codes, prob) > 1e-3

"""Hardware-aware draft length of the jitted loop: the width choice on hand-made cost tables, the widths worth
compiling, and losslessness (greedy identity, chi-square at T = 1) when rounds verify at chosen widths."""
from __future__ import annotations


import jax
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


@pytest.mark.parametrize("loop_options", [
    dict(verify_widths=(1, 2, 3), verify_costs=(1.0, 1.2, 1.9)),
    # plain rounds too: drafting pays only when a confident match lets a width-3 round commit > 1.6 tokens
    dict(verify_widths=(1, 3), verify_costs=(1.0, 1.0), plain_cost=1.0 / 1.6)])
def test_temperature_one_is_lossless_at_chosen_widths(loop_options):
    from tests.decoding.test_speculative import V_SMALL
    tg, ts, cfg = make_target("gemma3", vocab_size=V_SMALL)
    dg, ds = _ngram(cfg, 2, n_max=2, n_min=1)
    params = SamplingParams.create(1, 1.0, 3, 0.8)
    mode = FilterMode.for_params(3, 0.8)
    prompt = [1, 2, 1, 2, 1]
    _, prob = exact_joint(tg, ts, prompt, params, mode)
    codes, sp = sampled_joint(tg, ts, dg, ds, prompt, params, mode, **loop_options)
    proposed = np.asarray(sp.proposed)[np.asarray(sp.rounds)[:, None] > np.arange(sp.proposed.shape[1])]
    assert set(np.unique(proposed)) <= {w - 1 for w in loop_options["verify_widths"]}
    if "plain_cost" in loop_options:
        assert 0 < (proposed > 0).mean() < 1  # some rounds drafted, some did not
    assert chi_square_pvalue(codes, prob) > 1e-3


def _oracle(cfg, gamma):
    from flax import nnx
    from dspark_jax.testing.oracle_drafter import OracleDrafter
    return nnx.split(OracleDrafter(gamma, cfg.vocab_size))


def test_plain_rounds_follow_a_losing_drafted_round():
    """The gate: a drafted round expected to lose to a plain round is followed by 1, 2, 4, 8, … plain rounds
    (the drafter's propose skipped); when drafting pays every round drafts, as without the gate."""
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _oracle(cfg, 5)  # proposes the target's own greedy tokens: a width-6 round commits 6
    prompts = REPETITIVE[:2]
    loop = dict(verify_widths=(1, 6), verify_costs=(1.0, 1.0))
    _, losing = greedy_plain_and_speculative(tg, ts, dg, ds, prompts, 48, plain_cost=0.01, **loop)
    _, paying = greedy_plain_and_speculative(tg, ts, dg, ds, prompts, 48, plain_cost=100.0, **loop)
    _, ungated = greedy_plain_and_speculative(tg, ts, dg, ds, prompts, 48, **loop)
    for b in range(len(prompts)):
        r = int(losing.rounds[b])
        proposed = np.asarray(losing.proposed)[b, :r]
        np.testing.assert_array_equal(np.flatnonzero(proposed), [0, 2, 5, 10, 19])
        assert set(proposed) == {0, 5}
        assert np.asarray(losing.committed)[b, :r].sum() == 47
        assert (np.asarray(losing.confidence)[b, :r][proposed == 0] == 0).all()  # plain rounds: no confidences
    for name in ("rounds", "proposed", "accepted", "committed"):
        np.testing.assert_array_equal(np.asarray(getattr(paying, name)), np.asarray(getattr(ungated, name)))
    assert int(np.asarray(paying.rounds)[0]) == 8  # 47 tokens in rounds of 6


def test_forced_rounds_for_the_cost_profile():
    """`speculative_rounds` runs exactly num_rounds rounds at the forced width (or plain) from the prefilled state of
    `speculative_start`, one compilation for every count and width."""
    from dspark_jax.decoding.speculative import speculative_generate, speculative_rounds, speculative_start
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _oracle(cfg, 5)
    tokens = jnp.asarray([[5, 6, 7, 5], [9, 10, 11, 12]], jnp.int32)
    lens = jnp.asarray([4, 3], jnp.int32)
    params = SamplingParams.create(2)
    static = dict(max_new_tokens=40, stop_ids=(), verify_widths=(1, 3, 6))
    state = speculative_start(tg, ts, dg, ds, tokens, lens, jax.random.key(0), params, jnp.float32(0.0), **static)
    np.testing.assert_array_equal(np.asarray(state.num_generated), [1, 1])

    def generated(choice, rounds):
        out = speculative_rounds(tg, ts, dg, ds, state, params, jnp.float32(0.0), jnp.int32(choice),
                                 jnp.int32(rounds), **static)
        return np.asarray(out.num_generated)

    np.testing.assert_array_equal(generated(-1, 3), [4, 4])  # 1 from the prefill + one per plain round
    np.testing.assert_array_equal(generated(0, 3), [4, 4])
    np.testing.assert_array_equal(generated(1, 3), [10, 10])  # width 3: 2 accepted drafts + the bonus token
    np.testing.assert_array_equal(generated(2, 5), [31, 31])
    assert speculative_rounds._cache_size() == 1
    # the rounds continue the loop: its tokens equal speculative_generate's at the same width
    full = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(0), params, jnp.float32(0.0),
                                max_new_tokens=40, stop_ids=(), verify_widths=(1, 6))
    out = speculative_rounds(tg, ts, dg, ds, state, params, jnp.float32(0.0), jnp.int32(2), jnp.int32(5), **static)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, :31], np.asarray(full.tokens)[:, :31])


def test_round_costs_profile_and_cache(tmp_path, monkeypatch):
    from flax import nnx
    from dspark_jax.drafters.factory import Drafter
    from dspark_jax.round_costs import load_or_profile_round_costs
    from dspark_jax.target import Target
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _ngram(cfg, 3)
    drafter = Drafter(nnx.merge(dg, ds).config, dg, ds, "ngram")
    target = Target(cfg, tg, ts, None, "tiny")
    costs = load_or_profile_round_costs(target, drafter, batch=2)
    assert costs.widths == (1, 2, 3, 4) and len(costs.seconds) == 4 and costs.batch == 2
    assert costs.plain > 0 and all(s >= costs.plain for s in costs.seconds)  # a round adds the proposal
    files = list((tmp_path / "round_costs").glob("*.json"))
    assert len(files) == 1
    assert load_or_profile_round_costs(target, drafter, batch=2) == costs  # read back, not profiled again
    files[0].write_text("{broken")
    again = load_or_profile_round_costs(target, drafter, batch=2)
    assert again.widths == costs.widths and again.plain > 0
    load_or_profile_round_costs(target, drafter, batch=2, prompt_len=32, max_new_tokens=40)  # another cache length
    assert len(list((tmp_path / "round_costs").glob("*.json"))) == 2


def test_generate_text_with_auto_draft_length(tmp_path, monkeypatch):
    """`GenerationConfig(draft_length="auto")`: profiles round costs once (cached), decodes losslessly."""
    from dspark_jax.drafters.factory import random_drafter
    from dspark_jax.generation import GenerationConfig, generate_text
    from dspark_jax.testing.tiny_target import make_tiny_target
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    target = make_tiny_target()
    drafter = random_drafter(target, "dspark", gamma=3, num_layers=1)
    prompts = ["abcabcabc", "the same words"]
    cfg = GenerationConfig(max_new_tokens=12, batch_size=2)
    plain = generate_text(target, prompts, cfg)
    auto = generate_text(target, prompts, GenerationConfig(max_new_tokens=12, batch_size=2, draft_length="auto"),
                         drafter=drafter)
    assert [r.completion_ids for r in auto] == [r.completion_ids for r in plain]
    assert len(list((tmp_path / "round_costs").glob("*.json"))) == 1

"""Hardware-aware draft length of the jitted loop: the objectives (fluid, the exact one-round gain against
enumeration of outcomes, throughput), the water-filling allocation and the bucket choice against Python
references and hand-made tables, the buckets worth compiling, and losslessness (greedy identity, chi-square at
T = 1) when rounds verify flat buckets."""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.decoding.draft_length import (allocate_top_k, bucket_rates, budget_confidence, choose_bucket,
                                              completion_gain, covering_bucket, efficient_buckets, fluid_gain,
                                              profile_buckets, slack_of, throughput_gain, verified_drafts)
from dspark_jax.sampling import FilterMode, SamplingParams
from tests.drafters.test_ngram import REPETITIVE, _ngram, greedy_plain_and_speculative
from tests.decoding.test_speculative import chi_square_pvalue, exact_joint, make_target, sampled_joint


def _gain_by_enumeration(conf, verified, active, remaining):
    """1 + E[min_b (slack_b + X_b)] over active requests by enumerating every outcome (X_b accepted drafts of
    request b: P(X_b >= m) = Π_{i<=m} c_i for m <= min(ℓ_b, R_b − 1), requests independent)."""
    idx = [b for b in range(len(active)) if active[b]]
    if not idx:
        return 0.0
    lead = max(remaining[b] for b in idx)
    dists = []
    for b in idx:
        n = min(verified[b], remaining[b] - 1)
        at_least = [1.0] + [float(np.prod(conf[b, :m])) for m in range(1, n + 1)] + [0.0]
        dists.append([(lead - remaining[b] + m, at_least[m] - at_least[m + 1]) for m in range(n + 1)])
    total = 0.0
    for outcome in itertools.product(*dists):
        total += np.prod([p for _, p in outcome]) * min(v for v, _ in outcome)
    return 1.0 + total


def _expected_committed(conf, verified, remaining):
    """Per request: 1 + Σ_{j <= min(ℓ_b, R_b − 1)} Π_{i<=j} c_i (loops, no vectorisation)."""
    out = []
    for b in range(conf.shape[0]):
        total = 1.0
        for j in range(min(int(verified[b]), int(remaining[b]) - 1)):
            total += float(np.prod(conf[b, :j + 1]))
        out.append(total)
    return out


def _water_filling(conf, caps, budget, slack):
    """Python reference of `allocate_by_level`: take, one at a time, the next draft of the request whose
    level slack_b + Σ_{i<j} a_{b,i} is lowest (ties: lower position, then lower request), while a > 0."""
    a = np.cumprod(conf, axis=1)
    taken = [0] * len(caps)
    for _ in range(budget):
        options = [(slack[b] + a[b, :taken[b]].sum(), taken[b], b) for b in range(len(caps))
                   if taken[b] < caps[b] and a[b, taken[b]] > 0]
        if not options:
            break
        taken[min(options)[2]] += 1
    return taken


@pytest.mark.parametrize("seed", range(8))
def test_gain_allocation_and_choice_against_python_references(seed):
    rng = np.random.default_rng(seed)
    batch, g = 3, 4
    conf = rng.uniform(0.2, 1.0, (batch, g)).astype(np.float32)
    conf[0, rng.integers(0, g)] = 0.0 if seed % 3 == 0 else conf[0, 0]  # a dead draft: never taken
    n = rng.integers(0, g + 1, batch)
    active = np.array([True, True, seed % 2 == 0])
    remaining = rng.integers(1, 9, batch)
    buckets = (3, 4, 6, 9, 15)
    costs = tuple(np.cumsum(rng.uniform(0.1, 1.0, len(buckets))))
    args = jnp.asarray(conf), jnp.asarray(n), jnp.asarray(active), jnp.asarray(remaining)
    lead = remaining[active].max()
    slack = np.where(active, lead - remaining, 0)
    np.testing.assert_array_equal(np.asarray(slack_of(jnp.asarray(active), jnp.asarray(remaining))), slack)
    rates = {"fluid": [], "one_round": [], "throughput": []}
    for t in buckets:
        caps = np.where(active, np.minimum(n, t - batch), 0)
        want = _water_filling(conf, caps, t - active.sum(), slack)
        got = np.asarray(verified_drafts(*args, t, take_all=False))
        np.testing.assert_array_equal(got, want)
        assert active.sum() + got.sum() <= t
        assert active.sum() + np.asarray(verified_drafts(*args, t, take_all=False, objective="throughput")).sum() <= t
        gain = _gain_by_enumeration(conf, got, active, remaining)
        on = jnp.asarray(conf), jnp.asarray(got), jnp.asarray(active), jnp.asarray(remaining)
        np.testing.assert_allclose(float(completion_gain(*on)), gain, rtol=1e-5)
        committed = _expected_committed(conf, got, remaining)
        fluid = min(slack[b] + committed[b] for b in range(batch) if active[b])
        np.testing.assert_allclose(float(fluid_gain(*on)), fluid, rtol=1e-5)
        assert gain <= fluid + 1e-5  # E[min] <= min E
        top = np.asarray(verified_drafts(*args, t, take_all=False, objective="throughput"))
        np.testing.assert_array_equal(top, np.asarray(allocate_top_k(jnp.asarray(conf), jnp.asarray(caps),
                                                                     t - active.sum())))
        mean = np.mean([c for b, c in enumerate(_expected_committed(conf, top, remaining)) if active[b]])
        np.testing.assert_allclose(float(throughput_gain(jnp.asarray(conf), jnp.asarray(top), jnp.asarray(active),
                                                         jnp.asarray(remaining))), mean, rtol=1e-5)
        for name, value in (("fluid", fluid), ("one_round", gain), ("throughput", mean)):
            rates[name].append(value / costs[buckets.index(t)])
    need = active.sum() + n[active].sum()
    cover = next((i for i, t in enumerate(buckets) if t >= need and n[active].max(initial=0) <= t - batch),
                 len(buckets) - 1)
    assert int(covering_bucket(jnp.asarray(n), jnp.asarray(active), buckets)) == cover
    assert int(choose_bucket(*args, buckets, costs)) == int(np.argmax(rates["fluid"][:cover + 1]))
    for name, want in rates.items():
        assert int(choose_bucket(*args, buckets, costs, name)) == int(np.argmax(want[:cover + 1]))


def test_the_top_k_allocation_by_survival():
    """The engine's allocation (DSpark §5.2): the budget's drafts of highest prefix survival across requests."""
    conf = jnp.asarray([[0.95] * 4, [0.5] * 4, [0.9, 0.0, 0.9, 0.9]])
    np.testing.assert_array_equal(np.asarray(allocate_top_k(conf, jnp.asarray([4, 4, 4]), 5)), [4, 0, 1])
    np.testing.assert_array_equal(np.asarray(allocate_top_k(conf, jnp.asarray([2, 4, 4]), 5)), [2, 2, 1])


def test_choice_on_a_hand_made_table():
    buckets, costs = (1, 2, 4, 8), (1.0, 1.5, 1.9, 2.3)  # batch 1: a bucket is a width
    high = jnp.full((1, 7), 0.95)
    low = jnp.full((1, 7), 0.2)
    seven, yes, left = jnp.asarray([7]), jnp.asarray([True]), jnp.asarray([50])
    # confident drafts: 1 + Σ 0.95^k over 7 = 6.6 tokens for 2.3 beats every narrower width
    assert int(choose_bucket(high, seven, yes, left, buckets, costs)) == 3
    assert float(completion_gain(high, seven, yes, left)) == pytest.approx(1 + sum(0.95 ** k for k in range(1, 8)))
    # unlikely drafts: a plain step (1 token / 1.0) beats 1.2 / 1.5, 1.25 / 1.9, 1.25 / 2.3
    assert int(choose_bucket(low, seven, yes, left, buckets, costs)) == 0
    # never wider than what was proposed: 1 draft → width 2 at most
    assert int(choose_bucket(high, jnp.asarray([1]), yes, left, buckets, costs)) == 1
    # two tokens left: a second draft cannot commit anything, so width 2 is the best
    assert int(choose_bucket(high, seven, yes, jnp.asarray([2]), buckets, costs)) == 1
    # without costs: the smallest bucket holding every proposal
    assert int(choose_bucket(low, jnp.asarray([3]), yes, left, buckets, None)) == 2
    assert int(covering_bucket(jnp.asarray([0, 0]), jnp.asarray([True, True]), (2, 4, 8, 16))) == 0
    assert int(covering_bucket(jnp.asarray([0, 9]), jnp.asarray([True, True]), (2, 4, 8, 16))) == 3
    # equal rates: the smaller bucket
    assert int(choose_bucket(jnp.full((1, 7), 1.0), seven, yes, left, (1, 2), (1.0, 2.0))) == 0
    # without a cost model every proposed draft is verified when they fit, zero confidence included
    zero, act = jnp.zeros((4, 7)), jnp.ones((4,), bool)
    even = jnp.full((4,), 50)
    np.testing.assert_array_equal(
        np.asarray(verified_drafts(zero, jnp.asarray([2, 0, 1, 3]), act, even, 12, take_all=True)), [2, 0, 1, 3])
    np.testing.assert_array_equal(
        np.asarray(verified_drafts(zero, jnp.asarray([2, 0, 1, 3]), act, even, 12, take_all=False)),
        [0, 0, 0, 0])  # zero survival is never worth a row


def test_rates_trust_a_share_of_the_expected_progress():
    """`bucket_rates(scale=s)` counts a gain g as 1 + s·(g − 1): a 0.8-confidence draft at width 2 (cost 1.5)
    brings 1.8 tokens (rate 1.2) and beats a plain step (1.0); trusted half, 1.4 / 1.5 = 0.93 does not."""
    conf, one, yes, left = jnp.asarray([[0.8]]), jnp.asarray([1]), jnp.asarray([True]), jnp.asarray([10])
    np.testing.assert_allclose(np.asarray(bucket_rates(conf, one, yes, left, (1, 2), (1.0, 1.5))), [1.0, 1.2],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bucket_rates(conf, one, yes, left, (1, 2), (1.0, 1.5), scale=0.5)),
                               [1.0, 1.4 / 1.5], rtol=1e-6)
    assert int(choose_bucket(conf, one, yes, left, (1, 2), (1.0, 1.5))) == 1
    assert int(choose_bucket(conf, one, yes, left, (1, 2), (1.0, 1.5), scale=0.5)) == 0


def test_the_progress_record_of_drafted_rounds():
    """`_Rounds._gate_state` adds a drafted round's realized progress of the longest remaining request (min over
    the requests still running of slack + committed) and its expected progress over the same requests (min of
    their expected positions), each beyond a plain round's 1; `progress_scale` trusts (Σ realized + s) /
    (Σ expected + s) of the objective's gains, at most all of them."""
    from types import SimpleNamespace

    from dspark_jax.decoding.speculative import SpecState, _Outcome, _Rounds
    rounds = _Rounds(target=None, drafter=None, head=None, params=None, mode=None, stops=None, threshold=None,
                     max_new_tokens=10, buckets=(3,), costs=None, plain_cost=None, progress_prior=4.0)
    fields = {f: None for f in SpecState.__dataclass_fields__}
    c = SpecState(**dict(fields, num_generated=jnp.asarray([1, 3, 5]), done=jnp.asarray([False, False, False]),
                         progress=jnp.zeros((2,), jnp.float32), declined=jnp.int32(0)))
    assert float(rounds.progress_scale(c)) == 1.0  # no record yet: (0 + 4) / (0 + 4)

    def outcome(count, stopped, expected):
        res = SimpleNamespace(count=jnp.asarray(count), stopped=jnp.asarray(stopped),
                              nonfinite=jnp.zeros((3,), bool))
        return _Outcome(res=res, verified=None, confidence=None, confidence_logits=None, model_forward=None,
                        lookup_draft=None, lookup_expected=None, plain_left=jnp.int32(0), backoff=jnp.int32(1), stale_confidence=None,
                        expected=jnp.asarray(expected, jnp.float32))
    # remaining 9, 7, 5 → slack 0, 2, 4; the third request stopped: realized min(0 + 2, 2 + 1) = 2, expected
    # min(3.0, 3.5) = 3 (the stopped request's 2.0 does not count)
    after = rounds._gate_state(c, outcome([2, 1, 1], [False, False, True], [3.0, 3.5, 2.0]))
    np.testing.assert_allclose(np.asarray(after.progress), [1.0, 2.0])
    assert float(rounds.progress_scale(after)) == pytest.approx(5 / 6)
    # the slowest request stopped: the next one's position on both sides — min(2 + 1, 4 + 1) = 3 against 3.5
    np.testing.assert_allclose(np.asarray(rounds._gate_state(c, outcome([1, 1, 1], [True, False, False],
                                                                        [3.0, 3.5, 6.0])).progress), [2.0, 2.5])
    # a round whose every request stopped adds nothing
    same = rounds._gate_state(after, outcome([1, 1, 1], [True, True, True], [5.0, 5.0, 5.0]))
    np.testing.assert_allclose(np.asarray(same.progress), [1.0, 2.0])
    # more realized than expected: trusted fully, not more
    ahead = dataclasses.replace(c, progress=jnp.asarray([6.0, 1.0]))
    assert float(rounds.progress_scale(ahead)) == 1.0
    behind = dataclasses.replace(c, progress=jnp.asarray([0.0, 9.0]))
    assert float(rounds.progress_scale(behind)) == pytest.approx(4 / 13)
    assert float(dataclasses.replace(rounds, progress_prior=None).progress_scale(behind)) == 1.0
    # batch 1: the longest request is the only one, no minimum to be optimistic about
    assert float(rounds.progress_scale(dataclasses.replace(behind, num_generated=jnp.asarray([1])))) == 1.0
    with pytest.raises(ValueError, match="fluid"):  # the record measures the fluid objective's progress
        dataclasses.replace(rounds, objective="one_round")


def test_a_static_batch_drafts_for_its_slowest_requests():
    """The batch ends with its slowest request: drafts go to the requests furthest behind, a request far ahead
    gets none, and when every request is level one hopeless request makes drafting useless for all."""
    conf = jnp.asarray([[0.95] * 7, [0.9] * 7, [0.9] * 7, [0.9] * 7])
    n, act = jnp.full((4,), 7), jnp.ones((4,), bool)
    ahead = jnp.asarray([20, 40, 40, 40])  # request 0 is 20 tokens ahead of the others
    np.testing.assert_array_equal(np.asarray(verified_drafts(conf, n, act, ahead, 10, take_all=False)), [0, 2, 2, 2])
    # one request behind the rest: it takes the bucket's drafts (up to 6 here), the others none
    behind = jnp.asarray([40, 20, 20, 20])
    np.testing.assert_array_equal(np.asarray(verified_drafts(conf, n, act, behind, 10, take_all=False)), [6, 0, 0, 0])
    # level requests, three confident and one hopeless: no bucket beats a plain round (gain 1 per 1.0)
    hopeless = conf.at[3].set(0.05)
    level = jnp.full((4,), 40)
    buckets, costs = (4, 8, 16, 32), (1.05, 1.3, 1.8, 3.0)
    rates = np.asarray(bucket_rates(hopeless, n, act, level, buckets, costs))
    assert rates.max() < 1.0 / 1.0
    # all four confident: drafting for every request pays
    assert np.asarray(bucket_rates(conf, n, act, level, buckets, costs)).max() > 1.0 / 1.0
    # finished requests take no row and do not count
    first = jnp.asarray([True, False, False, False])
    np.testing.assert_array_equal(np.asarray(verified_drafts(conf, n, first, level, 8, take_all=False)), [4, 0, 0, 0])
    assert float(completion_gain(conf, jnp.asarray([4, 7, 7, 7]), first, level)) == pytest.approx(
        1 + sum(0.95 ** k for k in range(1, 5)))


def test_level_requests_draft_under_the_fluid_objective_only():
    """Eight level requests, each with one 0.8-confidence draft: the fluid objective credits each with 1.8
    tokens (a round at 16 rows for 1.4 beats a plain round), the exact one-round value only 1 + 0.8^8 (every
    request must accept), which never pays; bad objectives are named."""
    conf = jnp.full((8, 1), 0.8)
    n, act, left = jnp.ones((8,), jnp.int32), jnp.ones((8,), bool), jnp.full((8,), 50)
    buckets, costs = (8, 16), (1.0, 1.4)
    assert int(choose_bucket(conf, n, act, left, buckets, costs)) == 1
    assert float(fluid_gain(conf, n, act, left)) == pytest.approx(1.8)
    assert int(choose_bucket(conf, n, act, left, buckets, costs, "one_round")) == 0
    assert float(completion_gain(conf, n, act, left)) == pytest.approx(1 + 0.8 ** 8)
    with pytest.raises(ValueError, match="unknown draft-length objective 'fastest'"):
        bucket_rates(conf, n, act, left, buckets, costs, "fastest")


def test_the_bucket_of_sampled_drafts_never_reads_this_rounds_later_confidences():
    """Sampled model drafts: c_2.. depend on the drawn x_1.. (Markov head), so the bucket reads c_1 fresh and later
    positions from the last drafted round (c_1 repeated before one); deterministic rows read everything fresh."""
    fresh = jnp.asarray([[0.9, 0.2, 0.1], [0.8, 0.7, 0.6], [0.5, 0.4, 0.3]])
    stale = jnp.asarray([[0.5, 0.5, 0.5], [-1.0, -1.0, -1.0], [0.9, 0.9, 0.9]])
    sampled = jnp.asarray([True, True, False])
    np.testing.assert_allclose(np.asarray(budget_confidence(fresh, stale, sampled)),
                               [[0.9, 0.5, 0.5], [0.8, 0.8, 0.8], [0.5, 0.4, 0.3]])
    # the choice for a sampled row is the same whatever its later fresh confidences are
    n, act, buckets, costs = jnp.asarray([3]), jnp.asarray([True]), (1, 2, 4), (1.0, 1.05, 1.3)
    left = jnp.asarray([30])
    picks = {int(choose_bucket(budget_confidence(jnp.asarray([[0.9, later, later]]), jnp.full((1, 3), 0.2),
                                                 jnp.asarray([True])), n, act, left, buckets, costs))
             for later in (0.0, 0.5, 1.0)}
    assert len(picks) == 1
    picks = {int(choose_bucket(jnp.asarray([[0.9, later, later]]), n, act, left, buckets, costs))
             for later in (0.0, 1.0)}
    assert len(picks) == 2  # fresh confidences (deterministic drafts) do steer it


def test_buckets_worth_compiling_and_profiled():
    buckets = tuple(range(1, 13))
    costs = (1.0, 1.57, 1.88, 1.89, 2.16, 2.22, 2.3, 2.28, 2.3, 2.3, 2.3, 2.24)  # jagged, like XLA:CPU
    kept, kept_costs = efficient_buckets(buckets, costs, max_buckets=12)
    assert kept == (1, 2, 3, 4, 5, 6, 12)  # 7..11 cost at least as much as 12
    assert kept_costs == (1.0, 1.57, 1.88, 1.89, 2.16, 2.22, 2.24)
    few, _ = efficient_buckets(buckets, costs, max_buckets=4)
    assert few[0] == 1 and few[-1] == 12 and len(few) == 4
    # a hand-computed choice of one interior bucket: rounding waste Σ_i (cost(kept above i) / cost_i − 1) is
    # 4.74 keeping 12, 2.24 keeping 16, 1.63 keeping 32, 2.95 keeping 64 (the largest cost step, kept before
    # session 33)
    assert efficient_buckets((8, 12, 16, 32, 64, 128), (1.0, 1.3, 1.4, 2.0, 3.0, 5.0), max_buckets=3) == (
        (8, 32, 128), (1.0, 2.0, 5.0))
    rng = np.random.default_rng(0)
    for _ in range(20):  # the dynamic programme against every subset (ends kept, dominated buckets never)
        n = int(rng.integers(3, 9))
        sizes = tuple(int(x) for x in np.cumsum(rng.integers(1, 9, n)))
        cost = tuple(float(x) for x in np.cumsum(rng.uniform(-0.2, 1.0, n)) + 3.0)
        k = int(rng.integers(2, n + 1))

        def waste(keep):
            return sum(min(cost[j] for j in keep if j >= i) / cost[i] - 1.0 for i in range(n))
        allowed = [i for i in range(1, n - 1) if all(cost[i] < cost[j] for j in range(i + 1, n))]
        best = min(waste((0, *inner, n - 1)) for m in range(0, k - 1)
                   for inner in itertools.combinations(allowed, m))
        kept, _ = efficient_buckets(sizes, cost, max_buckets=k)
        assert len(kept) <= k and kept[0] == sizes[0] and kept[-1] == sizes[-1]
        assert waste(tuple(sizes.index(t) for t in kept)) == pytest.approx(best)
    for keep, sizes in [(1, (8, 12)), (0, (8,))]:
        with pytest.raises(ValueError, match="max_buckets"):
            efficient_buckets(sizes, (1.0, 2.0)[:len(sizes)], max_buckets=keep)
    assert efficient_buckets((1,), (0.5,)) == ((1,), (0.5,))
    assert efficient_buckets((8, 12), (1.0, 2.0)) == ((8, 12), (1.0, 2.0))
    for bad in [((1, 2), (1.0,)), ((0, 3), (1.0, 2.0)), ((1, 1), (1.0, 1.0)), ((1, 2), (1.0, -1.0))]:
        with pytest.raises(ValueError):
            efficient_buckets(*bad)
    assert profile_buckets(1, 11) == tuple(range(1, 13))  # batch 1: every width
    assert profile_buckets(2, 3) == (2, 3, 4, 5, 6, 7, 8)
    wide = profile_buckets(8, 11)
    assert wide[:9] == tuple(range(8, 17)) and wide[-1] == 96 and list(wide) == sorted(set(wide)) and len(wide) < 20
    assert {24, 32, 40, 48, 56} <= set(wide) and not {17, 23, 25} & set(wide)  # 8-row steps up to 64 rows
    assert profile_buckets(4, 7) == (4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 24, 32)


COSTS = dict(verify_buckets=(4, 8, 16, 24), verify_costs=(1.0, 1.3, 1.6, 2.0))


@pytest.mark.parametrize("loop_options", [dict(verify_buckets=(4, 12, 24)), COSTS,
                                          dict(COSTS, plain_cost=0.8, progress_prior=2.0)])
def test_greedy_identity_at_chosen_buckets(loop_options):
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _ngram(cfg, 5)
    _, spec = greedy_plain_and_speculative(tg, ts, dg, ds, REPETITIVE, 24, **loop_options)
    rounds, proposed = np.asarray(spec.rounds), np.asarray(spec.proposed)
    batch, largest = len(REPETITIVE), loop_options["verify_buckets"][-1]
    for r in range(rounds.max()):  # loop iteration r: the requests still active fill one bucket
        active = rounds > r
        assert (active.sum() + proposed[active, r].sum()) <= largest
    for b in range(batch):
        assert np.asarray(spec.committed)[b, :rounds[b]].sum() == 23
    if "verify_costs" not in loop_options:  # no cost model: every proposal fits the largest bucket, so all verified
        assert set(np.unique(proposed[rounds[:, None] > np.arange(proposed.shape[1])])) <= {0, 5}


def test_bad_buckets_are_rejected():
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _ngram(cfg, 3)
    for options in [dict(verify_buckets=(2, 4)), dict(verify_buckets=(1, 8)),
                    dict(verify_buckets=(1, 2), verify_costs=(1.0,))]:
        with pytest.raises(ValueError, match="verify"):
            greedy_plain_and_speculative(tg, ts, dg, ds, REPETITIVE[:1], 4, **options)


@pytest.mark.parametrize("drafter,loop_options", [
    ("ngram", dict(verify_buckets=(1, 2, 3), verify_costs=(1.0, 1.2, 1.9))),
    # plain rounds too: drafting pays only when confident matches shorten the pair's longer request by > 1.6
    ("ngram", dict(verify_buckets=(1, 3), verify_costs=(1.0, 1.0), plain_cost=1.0 / 1.6)),
    # and with the progress record trusting the objective only as far as earlier rounds realized it
    ("ngram", dict(verify_buckets=(1, 3), verify_costs=(1.0, 1.0), plain_cost=1.0 / 1.6, progress_prior=2.0)),
    # sampled model drafts: the bucket reads c_1 fresh and c_2 from the last drafted round
    ("dspark", dict(verify_buckets=(1, 2, 3), verify_costs=(1.0, 1.3, 1.9))),
    # the hybrid, its rounds without the model's forward priced by their own costs (`lookup_costs`)
    ("hybrid", dict(verify_buckets=(1, 2, 3), verify_costs=(1.0, 1.3, 1.9), lookup_costs=(1.0, 1.05, 1.1)))])
def test_temperature_one_is_lossless_at_chosen_buckets(drafter, loop_options):
    """Buckets given per request (× 2): batches of two requests, each batch choosing its rounds' buckets and
    allocation (vmapped over N_SAMPLES / 2 batches)."""
    from tests.decoding.test_speculative import V_SMALL, make_drafter
    tg, ts, cfg = make_target("gemma3", vocab_size=V_SMALL)
    if drafter == "hybrid":
        from tests.drafters.test_ngram import _hybrid
        dg, ds = _hybrid(cfg, 2)
    else:
        dg, ds = _ngram(cfg, 2, n_max=2, n_min=1) if drafter == "ngram" else make_drafter("dspark", cfg, 2, False)
    params = SamplingParams.create(1, 1.0, 3, 0.8)
    mode = FilterMode.for_params(3, 0.8)
    prompt = [1, 2, 1, 2, 1]
    _, prob = exact_joint(tg, ts, prompt, params, mode)
    options = dict(loop_options, verify_buckets=tuple(2 * w for w in loop_options["verify_buckets"]))
    codes, sp = sampled_joint(tg, ts, dg, ds, prompt, params, mode, batch=2, **options)
    proposed = np.asarray(sp.proposed)[np.asarray(sp.rounds)[:, None] > np.arange(sp.proposed.shape[1])]
    assert proposed.max() <= 2
    if drafter == "dspark":  # the rounds verified different numbers of drafts
        assert len(np.unique(proposed)) > 1
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
    loop = dict(verify_buckets=(2, 12), verify_costs=(1.0, 1.0))
    _, losing = greedy_plain_and_speculative(tg, ts, dg, ds, prompts, 48, plain_cost=0.01, **loop)
    _, paying = greedy_plain_and_speculative(tg, ts, dg, ds, prompts, 48, plain_cost=100.0, **loop)
    _, ungated = greedy_plain_and_speculative(tg, ts, dg, ds, prompts, 48, **loop)
    for b in range(len(prompts)):
        r = int(losing.rounds[b])
        proposed = np.asarray(losing.proposed)[b, :r]
        np.testing.assert_array_equal(np.flatnonzero(proposed), [0, 2, 5, 10, 19])
        assert set(proposed) == {0, 5}
        # the drafter model's forward ran in the drafted rounds only (RoundStats.model_forward)
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(losing.model_forward)[b, :r]), [0, 2, 5, 10, 19])
        assert np.asarray(losing.committed)[b, :r].sum() == 47
        assert (np.asarray(losing.confidence)[b, :r][proposed == 0] == 0).all()  # plain rounds: no confidences
    for name in ("rounds", "proposed", "accepted", "committed"):
        np.testing.assert_array_equal(np.asarray(getattr(paying, name)), np.asarray(getattr(ungated, name)))
    assert int(np.asarray(paying.rounds)[0]) == 8  # 47 tokens in rounds of 6


def test_the_gate_declines_a_round_that_would_verify_nothing():
    """A lookup round whose best bucket is the anchors' own (no draft: drafts verified at 100x a plain round) and
    that does not pay is declined — no verification, no token, not counted as a round —, and the plain rounds the
    gate schedules after it (1, 2, 4, 8, …) commit every token: 23 plain rounds, 5 declined proposals. A declined
    round leaves the cache, tokens and drafter state as they were; a round that ran a model's forward is never
    declined. Greedy output equals plain decoding's."""
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _ngram(cfg, 5)
    loop = dict(verify_buckets=(4, 24), verify_costs=(1.0, 100.0), plain_cost=0.5)
    _, spec = greedy_plain_and_speculative(tg, ts, dg, ds, REPETITIVE, 24, **loop)
    np.testing.assert_array_equal(np.asarray(spec.rounds), [23] * 4)
    assert int(spec.declined_rounds) == 5
    assert not np.asarray(spec.proposed).any() and (np.asarray(spec.committed)[:, :23] == 1).all()
    # a round that ran a drafter model's forward is verified even at the anchors' bucket (its commit is the
    # model's record of that forward): the same gate with the oracle drafter declines nothing
    _, model = greedy_plain_and_speculative(tg, ts, *_oracle(cfg, 5), REPETITIVE, 24, **loop)
    assert int(model.declined_rounds) == 0
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(model.model_forward)[0]), [0, 2, 5, 10, 19])
    # one declined round, step by step: only the gate's state moves
    from tests.drafters.test_ngram import _batch
    from dspark_jax.decoding.speculative import _rounds
    rounds = _rounds(tg, ts, dg, ds, SamplingParams.create(4), jnp.float32(0.0), batch=4, max_new_tokens=24,
                     stop_ids=(), mode=FilterMode(), **loop)
    c = rounds.start(*_batch(REPETITIVE), jax.random.key(0), pad_id=0)
    after = jax.jit(lambda s: rounds._apply(s, rounds.drafted(s)))(c)
    assert int(after.declined) == 1 and int(after.plain_left) == 1
    for name in ("tokens", "num_generated", "anchor", "start", "rounds", "target_cache", "drafter_state", "stats"):
        jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(c, name))


def test_forced_rounds_for_the_cost_profile():
    """`speculative_rounds` runs exactly num_rounds rounds at the forced bucket (or plain) from the prefilled state
    of `speculative_start`, one compilation for every count and bucket."""
    from dspark_jax.decoding.speculative import speculative_generate, speculative_rounds, speculative_start
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _oracle(cfg, 5)
    tokens = jnp.asarray([[5, 6, 7, 5], [9, 10, 11, 12]], jnp.int32)
    lens = jnp.asarray([4, 3], jnp.int32)
    params = SamplingParams.create(2)
    static = dict(max_new_tokens=40, stop_ids=(), verify_buckets=(2, 6, 12))
    state = speculative_start(tg, ts, dg, ds, tokens, lens, jax.random.key(0), params, jnp.float32(0.0), **static)
    np.testing.assert_array_equal(np.asarray(state.num_generated), [1, 1])

    def generated(choice, rounds):
        out = speculative_rounds(tg, ts, dg, ds, state, params, jnp.float32(0.0), jnp.int32(choice),
                                 jnp.int32(rounds), **static)
        return np.asarray(out.num_generated)

    np.testing.assert_array_equal(generated(-1, 3), [4, 4])  # 1 from the prefill + one per plain round
    np.testing.assert_array_equal(generated(0, 3), [4, 4])
    np.testing.assert_array_equal(generated(1, 3), [10, 10])  # 6 rows: 2 accepted drafts each + the bonus token
    np.testing.assert_array_equal(generated(2, 5), [31, 31])
    assert speculative_rounds._cache_size() == 1
    # the rounds continue the loop: its tokens equal speculative_generate's at the same width
    full = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(0), params, jnp.float32(0.0),
                                max_new_tokens=40, stop_ids=(), verify_buckets=(2, 12))
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
    assert costs.buckets == (2, 3, 4, 5, 6, 7, 8) and len(costs.seconds) == 7 and costs.batch == 2
    assert costs.plain > 0 and all(s >= costs.plain for s in costs.seconds)  # a round adds the proposal
    files = list((tmp_path / "round_costs").glob("*.json"))
    assert len(files) == 1
    assert load_or_profile_round_costs(target, drafter, batch=2) == costs  # read back, not profiled again
    # the same configuration under another name (other weights would not change a round's cost either): same profile
    renamed = Drafter(drafter.config, dg, ds, "ngram:n_max=3,n_min=1")
    assert load_or_profile_round_costs(target, renamed, batch=2) == costs
    # keying and re-profiling, without timing again (the profiler's output is checked above)
    import dataclasses
    from dspark_jax import round_costs
    calls = []

    def fake_profile(target, drafter, batch, buckets, **kw):
        calls.append(kw)
        return dataclasses.replace(costs, plain=costs.plain * 2)

    monkeypatch.setattr(round_costs, "profile_round_costs", fake_profile)
    other_dg, other_ds = _ngram(cfg, 3, n_max=2)  # another configuration, same buckets: its own profile
    load_or_profile_round_costs(target, Drafter(nnx.merge(other_dg, other_ds).config, other_dg, other_ds, "ngram"),
                                batch=2)
    assert len(calls) == 1 and len(list((tmp_path / "round_costs").glob("*.json"))) == 2
    files[0].write_text("{broken")
    again = load_or_profile_round_costs(target, drafter, batch=2)  # unreadable: profiled again and rewritten
    assert len(calls) == 2 and again.plain == 2 * costs.plain
    assert load_or_profile_round_costs(target, drafter, batch=2) == again
    load_or_profile_round_costs(target, drafter, batch=2, prompt_len=32, max_new_tokens=40)  # another cache length
    assert calls[-1] == {"prompt_len": 32, "max_new_tokens": 40, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
    assert len(calls) == 3 and len(list((tmp_path / "round_costs").glob("*.json"))) == 3
    # the sampling kind: sampled rounds get their own profile, profiled at the run's settings; another temperature
    # or top-p value of the same kind shares it, another static filter (top-k) does not
    load_or_profile_round_costs(target, drafter, batch=2, temperature=1.0)
    assert len(calls) == 4 and calls[-1]["temperature"] == 1.0
    load_or_profile_round_costs(target, drafter, batch=2, temperature=0.7)
    assert len(calls) == 4
    load_or_profile_round_costs(target, drafter, batch=2, temperature=0.7, top_k=20, top_p=0.8)
    assert len(calls) == 5 and (calls[-1]["top_k"], calls[-1]["top_p"]) == (20, 0.8)
    load_or_profile_round_costs(target, drafter, batch=2, temperature=1.0, top_k=20, top_p=0.9)
    assert len(calls) == 5
    load_or_profile_round_costs(target, drafter, batch=2, top_k=20, top_p=0.8)  # greedy: filters do not matter
    assert len(calls) == 5
    # hybrids: options that only steer the choice (the profile forces its model on and off) share one profile
    from tests.drafters.test_ngram import _hybrid

    def hybrid(**options):
        hg, hs = _hybrid(cfg, 3, **options)
        return Drafter(nnx.merge(hg, hs).config, hg, hs, "hybrid")
    load_or_profile_round_costs(target, hybrid(), batch=2)
    assert len(calls) == 6
    for options in (dict(price_model=False), dict(skip_model_at=2.0, model_prior_strength=8.0), dict(calibrated=True)):
        load_or_profile_round_costs(target, hybrid(**options), batch=2)
    assert len(calls) == 6
    calibrated_dg, calibrated_ds = _ngram(cfg, 3, calibrated=True)  # a lookup's calibration: no other cost
    load_or_profile_round_costs(target, Drafter(nnx.merge(calibrated_dg, calibrated_ds).config, calibrated_dg,
                                                calibrated_ds, "ngram:calibrated=1"), batch=2)
    assert len(calls) == 6
    # a corpus table's size is the drafter's state, not its structure: a larger table searches further, its own
    # profile; another table of the same shapes costs the same
    from dspark_jax.drafters.corpus import build_table
    from dspark_jax.drafters.ngram import NgramConfig, NgramDrafter

    def with_corpus(responses):
        cg, cs = nnx.split(NgramDrafter(NgramConfig(block_size=3, n_max=3, n_min=1, corpus=True), cfg.vocab_size,
                                        build_table(responses, n_max=3, max_draft=3)))
        return Drafter(nnx.merge(cg, cs).config, cg, cs, "ngram:corpus=1")
    load_or_profile_round_costs(target, with_corpus([[1, 2, 3, 4, 5]]), batch=2)
    assert len(calls) == 7
    load_or_profile_round_costs(target, with_corpus([[5, 4, 3, 2, 1]]), batch=2)
    assert len(calls) == 7
    load_or_profile_round_costs(target, with_corpus([[1, 2, 3, 4, 5, 6, 7, 8, 9]]), batch=2)
    assert len(calls) == 8
    # a target whose head reads the embedding's Q8_0 blocks (another cost of a round): its own profile
    from tests.models.test_q8_head import q8_model
    qg, qs = nnx.split(q8_model(cfg))
    q8_target = Target(cfg, qg, qs, None, "tiny")
    assert q8_target.q8_head and not target.q8_head
    load_or_profile_round_costs(q8_target, drafter, batch=2)
    assert len(calls) == 9


def _spied_profile(monkeypatch, split_drafter, name: str, record, **profile_options):
    """profile_round_costs of a tiny target and `split_drafter` (graphdef, state) at batch 1, buckets (1, 2, 3), one
    pass, with record(args, kw) of every `speculative_rounds` call it makes: (costs, records)."""
    from flax import nnx
    from dspark_jax import round_costs
    from dspark_jax.drafters.factory import Drafter
    from dspark_jax.target import Target
    tg, ts, cfg = make_target("gemma3")
    dg, ds = split_drafter(cfg)
    seen = []
    real_rounds = round_costs.speculative_rounds

    def spy(*args, **kw):
        seen.append(record(args, kw))
        return real_rounds(*args, **kw)

    monkeypatch.setattr(round_costs, "speculative_rounds", spy)
    costs = round_costs.profile_round_costs(Target(cfg, tg, ts, None, "tiny"),
                                            Drafter(nnx.merge(dg, ds).config, dg, ds, name), 1, (1, 2, 3), repeats=1,
                                            **profile_options)
    return costs, seen


def test_round_costs_profiled_sampled(monkeypatch):
    """A sampled profile runs the loop's rounds with sampling on (temperature > 0 and the run's filters)."""
    from dspark_jax.sampling import FilterMode
    costs, seen = _spied_profile(monkeypatch, lambda cfg: _ngram(cfg, 2), "ngram",
                                 lambda args, kw: (float(args[5].temperature[0]), int(args[5].top_k[0]), kw["mode"]),
                                 temperature=0.5, top_k=5)
    assert len(costs.seconds) == 3 and costs.plain > 0 and costs.lookup_seconds is None
    assert seen and all(s == (0.5, 5, FilterMode(max_top_k=5, top_p=False, all_top_k=True)) for s in seen)


def test_hybrid_profile_times_rounds_with_and_without_the_model(monkeypatch):
    """A hybrid drafter's profile times its rounds twice at every bucket: the model's forward forced on
    (`seconds`) and skipped (`lookup_seconds`); `loop_settings` hands both to the loop at the efficient buckets."""
    from flax import nnx
    from dspark_jax.round_costs import PROGRESS_PRIOR, RoundCosts
    from tests.drafters.test_ngram import _hybrid
    costs, seen = _spied_profile(monkeypatch, lambda cfg: _hybrid(cfg, 2), "random+ngram",
                                 lambda args, kw: nnx.merge(args[2], args[3]).config.skip_model_at)
    assert set(seen) == {float("inf"), 0.0}  # forced on, forced off
    assert len(costs.seconds) == len(costs.lookup_seconds) == 3
    assert all(s >= costs.plain for s in costs.seconds + costs.lookup_seconds)
    table = RoundCosts(1, (1, 2, 3), (1.0, 3.0, 2.0), 0.5, lookup_seconds=(0.6, 0.7, 0.8))
    assert table.loop_settings() == dict(verify_buckets=(1, 3), verify_costs=(1.0, 2.0), plain_cost=0.5,
                                         lookup_costs=(0.6, 0.8), progress_prior=PROGRESS_PRIOR)
    assert "lookup_costs" not in dataclasses.replace(table, lookup_seconds=None).loop_settings()


def test_round_timings_reduce_to_median_costs():
    """`RoundTimings.costs`: each bucket's median seconds over the passes and the median plain round (each pass's
    plain round the mean of its two timings); costs below a plain round are clipped to it; a second variant (a
    hybrid's model skipped) becomes `lookup_seconds`."""
    from dspark_jax.round_costs import RoundTimings
    timings = RoundTimings(1, (1, 2, 3), (1.0, 2.0, 1.2), ((
        (0.9, 0.8, 0.7), (3.5, 1.4, 1.5), (2.0, 2.6, 2.4)),))
    costs = timings.costs()
    assert (costs.batch, costs.buckets, costs.plain, costs.lookup_seconds) == (1, (1, 2, 3), 1.2, None)
    assert costs.seconds == pytest.approx((1.2, 1.5, 2.4))  # 0.8 clipped to the plain round
    hybrid = RoundTimings(1, (1, 2), (1.0, 1.0), (((1.2, 1.4), (2.0, 2.2)), ((1.0, 1.1), (1.5, 1.5))))
    assert hybrid.costs().seconds == pytest.approx((1.3, 2.1))
    assert hybrid.costs().lookup_seconds == pytest.approx((1.05, 1.5))


def test_rounds_that_skip_the_model_are_priced_by_lookup_costs():
    """A hybrid whose model's forward never runs (skip_model_at 0): with verification priced so that drafting
    loses (`verify_costs`) no round verifies a draft; with the same rounds priced by `lookup_costs` under which
    lookup drafts pay, rounds verify them. Greedy output equals plain decoding's."""
    from tests.drafters.test_ngram import _hybrid
    tg, ts, cfg = make_target("gemma3")
    dg, ds = _hybrid(cfg, 3, skip_model_at=0.0)
    prompts = REPETITIVE[3:]  # batch 1, no plain rounds: the wide bucket wherever lookup expects an accepted draft
    loop = dict(verify_buckets=(1, 4), verify_costs=(1.0, 100.0))
    plain, dear = greedy_plain_and_speculative(tg, ts, dg, ds, prompts, 24, **loop)
    _, cheap = greedy_plain_and_speculative(tg, ts, dg, ds, prompts, 24, lookup_costs=(1.0, 1.0), **loop)
    for out in (dear, cheap):
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))
    assert np.asarray(dear.proposed).sum() == 0 and np.asarray(cheap.proposed).sum() > 0
    with pytest.raises(ValueError, match="lookup_costs"):
        greedy_plain_and_speculative(tg, ts, dg, ds, prompts, 4, lookup_costs=(1.0,), **loop)


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


def test_the_hybrid_runs_its_model_only_where_the_loop_prices_it_to_pay():
    """`price_model` in the loop (skip_model_at inf: the model's forward would run in every round): rounds with the
    forward priced at 3 a round (`verify_costs`), without it at 1 (`lookup_costs`). The forward runs in the first
    round (predicted to accept every draft: the model never ran) and, with the random model's record, never again;
    unpriced (price_model off) in every round; at 100 never; as cheap as a lookup round, in most rounds — but never
    where a plain round (the gate on) beats any round it could make. Greedy output equals plain decoding's
    throughout."""
    import jax
    from tests.drafters.test_ngram import _batch, _hybrid
    from dspark_jax.decoding.speculative import _rounds
    tg, ts, cfg = make_target("gemma3")
    batch = [[5, 6, 7, 5, 6, 7, 5, 6], [3, 9, 14, 22]]
    prompts, lens = _batch(batch)

    def model_rounds(price_model, model_cost, plain_cost=None):
        dg, ds = _hybrid(cfg, 3, price_model=price_model, skip_model_at=float("inf"))
        rounds = _rounds(tg, ts, dg, ds, SamplingParams.create(2), jnp.float32(0.0), batch=2, max_new_tokens=10,
                         stop_ids=(), mode=FilterMode(), verify_buckets=(2, 8), verify_costs=(model_cost, model_cost),
                         plain_cost=plain_cost, lookup_costs=(1.0, 1.0))
        c = rounds.start(prompts, lens, jax.random.key(0), pad_id=0)
        # with the gate on, its plain rounds too (a declined round commits nothing: `_Rounds.drafted`)
        step = jax.jit(rounds.step if plain_cost else lambda s: rounds._apply(s, rounds.drafted(s)))
        while not bool(jnp.all(c.done)):
            c = step(c)
        # the loop's record of the rounds that ran the forward agrees with the hybrid's own count
        np.testing.assert_array_equal(np.asarray(c.stats.model_forward).sum(1), np.asarray(c.drafter_state.model_rounds))
        return np.asarray(c.drafter_state.model_rounds), np.asarray(c.rounds), np.asarray(c.tokens)[:, :10]

    plain, _ = greedy_plain_and_speculative(tg, ts, *_hybrid(cfg, 3), batch, 10, verify_buckets=(2, 8))
    # a model round at 3x: worth it while the model is predicted to accept everything (the first round), not after
    priced, active_rounds, tokens = model_rounds(True, 3.0)
    np.testing.assert_array_equal(priced, [1, 1])
    assert active_rounds.min() > 3
    unpriced, active_rounds, tokens_unpriced = model_rounds(False, 3.0)
    np.testing.assert_array_equal(unpriced, active_rounds)  # skip_model_at inf: every round each request is in
    assert model_rounds(True, 100.0)[0].sum() == 0  # not even the first round: 4 tokens at most for 100x
    cheap, _, tokens_cheap = model_rounds(True, 1.0)
    assert (cheap > 3).all()  # as cheap as a lookup round: it runs wherever its predicted rows add progress
    # ... also beside a plain round that costs as much (the gate on: its rounds still add progress); but never
    # where a plain round at a fifth of the cost beats any round it could make (4 tokens at most for 1)
    gated, _, tokens_gated = model_rounds(True, 1.0, plain_cost=1.0)
    assert (gated > 3).all()
    dear, _, tokens_dear = model_rounds(True, 1.0, plain_cost=0.2)
    assert dear.sum() == 0
    for t in (tokens, tokens_unpriced, tokens_cheap, tokens_gated, tokens_dear):
        np.testing.assert_array_equal(t, np.asarray(plain.tokens))


def test_a_round_that_verifies_nothing_never_beats_a_plain_round():
    """`gated_choice`: with the zero-draft bucket's cost clipped to the plain round's (a real batch-8 lookup profile,
    session 53: 0.05178… s, where float32 1 / cost exceeds float64 1 / plain_cost), a round with nothing to verify does
    not pay; a round whose drafts are expected to accept does, at the bucket `choose_bucket` picks."""
    from dspark_jax.decoding.draft_length import bucket_rates, gated_choice, gated_rates
    plain = 0.051783589624392334
    assert np.float32(1.0) / np.float32(plain) > 1.0 / plain  # the tie the float64 comparison broke into drafting
    buckets, costs = (8, 9, 16), (plain, 0.0607, 0.0982)
    active, left = jnp.ones((8,), bool), jnp.full((8,), 50)
    none = jnp.zeros((8,), jnp.int32)
    choice, pays = gated_choice(jnp.zeros((8, 15)), none, active, left, buckets, costs, plain)
    assert int(choice) == 0 and not bool(pays)
    # drafts nobody proposed but confidences from an earlier round: still nothing to verify
    choice, pays = gated_choice(jnp.full((8, 15), 0.9), none, active, left, buckets, costs, plain)
    assert int(choice) == 0 and not bool(pays)
    # one request 10 tokens behind with sure drafts: bucket 16 verifies 8 of them (gain 9 at 1.9x a plain round)
    behind = left.at[3].set(60)
    sure = jnp.zeros((8, 15)).at[3].set(1.0)
    drafted = none.at[3].set(15)
    choice, pays = gated_choice(sure, drafted, active, behind, buckets, costs, plain)
    assert int(choice) == int(choose_bucket(sure, drafted, active, behind, buckets, costs)) == 2 and bool(pays)
    # gated_rates: the same choice and verdict, with bucket_rates' rates
    rates, choice_r, pays_r = gated_rates(sure, drafted, active, behind, buckets, costs, plain)
    np.testing.assert_array_equal(np.asarray(rates), np.asarray(bucket_rates(sure, drafted, active, behind, buckets,
                                                                             costs)))
    assert int(choice_r) == 2 and bool(pays_r)
    # the same drafts where every drafted round costs more than its gain in plain rounds: plain pays
    choice, pays = gated_choice(sure, drafted, active, behind, buckets, (plain, 2.1 * plain, 9.5 * plain), plain)
    assert int(choice) == 0 and not bool(pays)

"""Prefix scheduler on hand-made confidence / SPS tables, and the paper's Appendix A counterexample as a
statistical test: the synchronous search without early stop is biased, the two lossless variants are not."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dspark_jax.decoding.rejection import verify
from dspark_jax.serving.cost_table import CostTable
from dspark_jax.decoding.draft_length import allocate_top_k
from dspark_jax.serving.scheduler import (capacity, drafting_pays, expected_throughput, fixed_lengths,
                                         schedule_synchronous, survival, threshold_lengths)

SMOOTH = CostTable((1, 2, 3, 4, 5, 6, 7, 8), (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65))


def test_survival_is_the_cumulative_product():
    np.testing.assert_allclose(survival([[0.9, 0.5, 1.0]]), [[0.9, 0.45, 0.45]])


def test_idle_machine_verifies_long_drafts_and_loaded_machine_short_ones():
    conf = np.array([[0.9, 0.9, 0.9, 0.9]])
    flat = CostTable((1, 2, 3, 4, 5), (1.0, 1.0, 1.0, 1.0, 1.0))  # verifying more is free: take everything
    assert schedule_synchronous(conf, flat).tolist() == [4]
    steep = CostTable((1, 2, 3, 4, 5), (1.0, 0.5, 0.3, 0.2, 0.1))  # every token halves the speed: take none
    assert schedule_synchronous(conf, steep).tolist() == [0]


def test_hand_computed_allocation_across_requests():
    # survival: r0 = .9,.72 ; r1 = .6,.3 ; greedy order (0,0) .9, (0,1) .72, (1,0) .6, (1,1) .3
    conf = np.array([[0.9, 0.8], [0.6, 0.5]])
    # B=2: Θ=2·1.0=2.0; B=3: 2.9·.9=2.61; B=4: 3.62·.85=3.077; B=5: 4.22·.8=3.376; B=6: 4.52·.75=3.39
    assert schedule_synchronous(conf, SMOOTH).tolist() == [2, 2]
    # cap request 0 at one draft: path (0,0), (1,0), (1,1)
    assert schedule_synchronous(conf, SMOOTH, max_draft=np.array([1, 2])).tolist() == [1, 2]


def test_early_stop_halts_at_a_jagged_cliff_and_the_global_search_jumps_it():
    conf = np.array([[0.9, 0.9, 0.9, 0.9]])
    jagged = CostTable((1, 2, 3, 4, 5), (1.0, 0.5, 0.5, 0.5, 0.5))  # cliff at 2 tokens, flat afterwards
    # Θ: B=1 → 1.0; B=2 → 1.9·.5 = .95 (stop); global: B=5 → (1+.9+.81+.729+.6561)·.5 = 2.05
    assert schedule_synchronous(conf, jagged).tolist() == [0]
    assert schedule_synchronous(conf, jagged, early_stop=False).tolist() == [4]
    assert capacity(conf, jagged) == 4


def test_base_tokens_from_static_requests_shift_the_curve():
    conf = np.array([[0.9, 0.9]])
    table = CostTable((1, 2, 3, 4), (1.0, 1.0, 1.0, 0.1))
    assert schedule_synchronous(conf, table).tolist() == [2]
    assert schedule_synchronous(conf, table, base_tokens=2).tolist() == [0]  # B starts at 3; B=4 collapses


def test_cost_table_lookup_and_validation(tmp_path):
    t = CostTable((4, 8, 16), (10.0, 8.0, 5.0))
    assert [t.sps(b) for b in (1, 4, 5, 16, 17)] == [10.0, 10.0, 8.0, 5.0, 0.0]
    assert t.bucket_for(9) == 16 and t.bucket_for(17) is None
    assert CostTable.load(t.save(tmp_path / "c.json")) == t
    with pytest.raises(ValueError, match="increasing"):
        CostTable((8, 4), (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        CostTable((4,), (0.0,))
    with pytest.raises(FileNotFoundError, match="dspark profile"):
        CostTable.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        CostTable.load(tmp_path / "bad.json")
    with_plain = dataclasses.replace(t, plain_steps_per_s=12.5)
    assert CostTable.load(with_plain.save(tmp_path / "p.json")) == with_plain
    legacy = CostTable.from_json(dict(buckets=[4, 8], steps_per_s=[2.0, 1.0]))  # tables written before the field
    assert legacy.plain_steps_per_s is None
    with pytest.raises(ValueError, match="plain steps/s"):
        dataclasses.replace(t, plain_steps_per_s=-1.0)


def test_drafting_pays_compares_expected_throughput_with_the_draft_free_step():
    conf = np.array([[0.9, 0.5], [0.2, 0.9]])
    table = CostTable((2, 3, 4), (10.0, 8.0, 6.0))
    # verifying (2, 1) drafts: B = 2 + 3 = 5 > the largest bucket -> 0; verifying (1, 0): B = 3, τ = 2 + 0.9
    assert expected_throughput(conf, np.array([2, 1]), table) == 0.0
    assert expected_throughput(conf, np.array([1, 0]), table) == pytest.approx(2.9 * 8.0)
    assert expected_throughput(conf, np.array([0, 0]), table) == pytest.approx(2 * 10.0)
    assert drafting_pays(conf, np.array([1, 0]), table)  # no profiled draft-free step: never turn drafting off
    assert drafting_pays(conf, np.array([1, 0]), dataclasses.replace(table, plain_steps_per_s=11.5))  # 23.2 > 23
    assert not drafting_pays(conf, np.array([1, 0]), dataclasses.replace(table, plain_steps_per_s=11.7))
    # no drafts at all: the draft step costs the drafter for nothing, so any faster draft-free step wins
    assert not drafting_pays(conf, np.array([0, 0]), dataclasses.replace(table, plain_steps_per_s=10.1))
    # ... and even where noise profiled the draft-free step slower than a draft step (20 > 2 * 9.9): never pays
    assert not drafting_pays(conf, np.array([0, 0]), dataclasses.replace(table, plain_steps_per_s=9.9))


def test_static_policies():
    conf = np.array([[0.9, 0.4, 0.9], [0.2, 0.9, 0.9]])
    assert fixed_lengths(2, 3, np.array([1, 3])).tolist() == [1, 3]
    assert threshold_lengths(conf, 0.5).tolist() == [1, 0]
    assert threshold_lengths(conf, 0.1).tolist() == [3, 3]


def test_top_k_allocation_matches_a_sort_and_gives_prefixes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        conf = rng.uniform(0.05, 1.0, (5, 4)).astype(np.float32)
        caps = rng.integers(0, 5, 5)
        k = int(rng.integers(0, 21))
        got = np.asarray(allocate_top_k(jnp.asarray(conf), jnp.asarray(caps), jnp.int32(k)))
        a = survival(conf)
        cands = sorted(((-a[r, j], j, r) for r in range(5) for j in range(caps[r])))
        want = np.zeros(5, int)
        for _, j, r in cands[:k]:
            want[r] += 1
        np.testing.assert_array_equal(got, want)
        assert (got <= caps).all() and got.sum() == min(k, caps.sum())


# ---- Appendix A: selection bias without early stop -------------------------------------------------------

P_TARGET = np.array([0.7, 0.3])   # tokens A, B
P_DRAFT = np.array([0.5, 0.5])
APPENDIX_A = CostTable((1, 2, 3), (1.0, 0.5, 0.45))
N = 40000


def _confidences(x1: np.ndarray) -> np.ndarray:
    """c_1 = 0.8 for everyone; c_2 depends on the drafted x_1 (Markov head): 0.9 after A, 0 after B."""
    return np.stack([np.full(len(x1), 0.8), np.where(x1 == 0, 0.9, 0.0)], axis=1)


def _first_token(lengths: np.ndarray, x1: np.ndarray, key) -> np.ndarray:
    """Runs the real rejection sampler on one-position drafts (verify x_1 iff length >= 1)."""
    n = len(x1)
    p_target = jnp.broadcast_to(jnp.asarray(P_TARGET, jnp.float32), (n, 2, 2))
    p_dx = jnp.full((n, 1), 0.5, jnp.float32)
    full = jnp.broadcast_to(jnp.asarray(P_DRAFT, jnp.float32), (n, 2))
    verdict = verify(key, jnp.asarray(x1[:, None], jnp.int32), p_dx, lambda k: full, p_target,
                     jnp.asarray(np.minimum(lengths, 1), jnp.int32))
    acc = np.asarray(verdict.num_accepted) > 0
    return np.where(acc, x1, np.asarray(verdict.next_token))


def _pvalue(tokens: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=2)
    return stats.chisquare(counts, P_TARGET * len(tokens)).pvalue


@pytest.mark.parametrize("variant", ["early_stop", "production", "biased"])
def test_appendix_a_counterexample(variant):
    rng = np.random.default_rng(1)
    x1 = rng.choice(2, size=N, p=P_DRAFT)
    conf = _confidences(x1)
    if variant == "early_stop":  # Algorithm 1 per request
        lengths = np.array([schedule_synchronous(c[None], APPENDIX_A)[0] for c in conf[:64]])
        assert (lengths == 0).all()  # Θ1 = 0.9 < Θ0 = 1: stop before looking at c_2
        lengths = np.zeros(N, int)
    elif variant == "production":  # budget from confidences two steps old (independent of x_1), fresh top-K
        stale = _confidences(rng.choice(2, size=N, p=P_DRAFT))
        budgets = np.array([capacity(c[None], APPENDIX_A) for c in stale])
        per_request = jax.vmap(lambda c, k: allocate_top_k(c[None], jnp.array([2]), k)[0])
        lengths = np.asarray(per_request(jnp.asarray(conf, jnp.float32), jnp.asarray(budgets, jnp.int32)))
        assert set(np.unique(budgets)) == {0, 2}  # set by the stale draw, independent of the fresh x_1 ...
        assert lengths[x1 == 1].max() == 1  # ... and a fresh zero survival is never verified
    else:  # global search without early stop on the fresh confidences
        lengths = np.array([schedule_synchronous(c[None], APPENDIX_A, early_stop=False)[0] for c in conf])
        assert set(lengths[x1 == 0]) == {2} and set(lengths[x1 == 1]) == {0}
    tokens = _first_token(lengths, x1, jax.random.key(5))
    p = _pvalue(tokens)
    if variant == "biased":
        assert abs(tokens.mean() - 0.15) < 0.01  # P(B) = 0.5·0.3 = 0.15 instead of 0.3
        assert p < 1e-10
    else:
        assert p > 1e-3

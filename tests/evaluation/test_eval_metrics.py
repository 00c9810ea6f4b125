"""Evaluation metrics against hand-computed examples: accept length (pooled, not per-request), proposal
length, verify rate, prefix survival, conditional acceptance, ECE / ROC-AUC / Brier, and the offline
threshold sweep."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from dspark_jax.evaluation import acceptance as acc
from dspark_jax.evaluation.records import RoundRecords
from dspark_jax.evaluation.reliability import (brier_score, ece_noise_floor, expected_calibration_error,
                                               position_reliability, reliability_curve, roc_auc, survival_pairs,
                                               weighted_mean)
from dspark_jax.evaluation.sweep import threshold_sweep


def make_records(request, proposed, accepted, committed, g=3, confidence=None, model_forward=None):
    n = len(request)
    flags = np.arange(g)[None] < np.asarray(accepted)[:, None]
    conf = np.full((n, g), 0.5, np.float32) if confidence is None else np.asarray(confidence, np.float32)
    return RoundRecords(request=np.asarray(request), proposed=np.asarray(proposed), accepted=np.asarray(accepted),
                        committed=np.asarray(committed), accept_flags=flags, confidence=conf,
                        confidence_logits=np.zeros((n, g), np.float32),
                        model_forward=np.ones(n, bool) if model_forward is None else np.asarray(model_forward),
                        lookup_draft=np.zeros(n, bool), lookup_expected=np.zeros(n, np.float32))


def test_pooled_accept_length_differs_from_per_request_mean_and_is_reported():
    # request 0: one round committing 4 tokens; request 1: three rounds committing 1 each
    r = make_records(request=[0, 1, 1, 1], proposed=[3, 3, 3, 3], accepted=[3, 0, 0, 0], committed=[4, 1, 1, 1])
    assert acc.accept_length(r) == pytest.approx(7 / 4)  # Σ committed / Σ rounds
    assert acc.per_request_accept_length(r) == pytest.approx((4 + 1) / 2)
    assert acc.summarize_acceptance(r).accept_length == pytest.approx(7 / 4)


def test_proposal_length_verify_rate_survival_and_conditional_acceptance():
    # γ = 3; a threshold cut two proposals short
    r = make_records(request=[0, 0, 0, 0, 0], proposed=[3, 3, 2, 1, 3], accepted=[3, 1, 2, 0, 2],
                     committed=[4, 2, 3, 1, 3])
    assert acc.mean_proposed(r) == pytest.approx(12 / 5)
    assert acc.verify_rate(r) == pytest.approx(13 / 17)  # Σ committed / Σ (proposed + 1)
    # k=1: A>=1 in 4 of 5 verified; k=2: A>=2 in 3 of 4 rounds verifying 2; k=3: A>=3 in 1 of 3
    np.testing.assert_allclose(acc.prefix_survival(r), [4 / 5, 3 / 4, 1 / 3])
    # k=2: reached (A>=1 and proposed>=2) = rounds 0,1,2,4 -> accepted in 0, 2, 4; k=3: reached = rounds 0, 4
    np.testing.assert_allclose(acc.conditional_acceptance(r), [4 / 5, 3 / 4, 1 / 2])


def test_model_rounds_count_the_rounds_that_ran_the_drafter_model():
    # a hybrid's rounds: the model ran in rounds 0 and 2; rounds 1, 3 drafted by lookup alone
    r = make_records(request=[0, 0, 0, 1], proposed=[3, 2, 3, 1], accepted=[1, 2, 0, 1], committed=[2, 3, 1, 2],
                     model_forward=[True, False, True, False])
    assert acc.model_rounds(r) == 2
    assert acc.summarize_acceptance(r).model_rounds == 2
    assert acc.model_rounds(RoundRecords.concatenate([r, r])) == 4


def test_empty_denominators_are_nan():
    r = make_records(request=[0], proposed=[1], accepted=[0], committed=[1])
    s = acc.prefix_survival(r)
    assert s[0] == 0 and np.isnan(s[1:]).all()
    assert np.isnan(acc.conditional_acceptance(r)[1:]).all()


def test_ece_hand_example():
    pred = np.array([0.1, 0.1, 0.9, 0.9])
    label = np.array([0, 1, 1, 1])
    # bin of 0.1: |0.1 - 0.5| x 2; bin of 0.9: |0.9 - 1| x 2  -> (0.8 + 0.2) / 4
    assert expected_calibration_error(pred, label, bins=10) == pytest.approx(0.25)
    assert expected_calibration_error(np.array([0.3, 0.7]), np.array([0, 1]), bins=1) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([1.0]), np.array([1]), bins=20) == 0.0  # 1.0 lands in the last bin
    mean_pred, observed, count = reliability_curve(pred, label, bins=10)
    assert count.sum() == 4 and count[1] == 2 and count[9] == 2
    assert observed[1] == pytest.approx(0.5) and np.isnan(observed[0])


def test_auc_hand_example_and_brute_force():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)  # a tie counts ½
    assert np.isnan(roc_auc(np.array([0.2, 0.3]), np.array([1, 1])))
    rng = np.random.default_rng(0)
    score = rng.integers(0, 6, 60) / 5.0  # many ties
    label = rng.random(60) < 0.4
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(score[label], score[~label])]
    assert roc_auc(score, label) == pytest.approx(np.mean(pairs))


def test_brier():
    assert brier_score(np.array([0.2, 0.9]), np.array([0, 1])) == pytest.approx((0.04 + 0.01) / 2)


def test_survival_pairs_use_cumulative_product_and_only_verified_positions():
    conf = np.array([[0.5, 0.8, 0.5], [0.9, 0.5, 0.5]])
    flags = np.array([[True, False, False], [True, True, False]])
    pairs = survival_pairs(conf, flags, proposed=np.array([3, 2]))
    np.testing.assert_allclose(pairs[0][0], [0.5, 0.9])
    np.testing.assert_allclose(pairs[1][0], [0.4, 0.45])
    np.testing.assert_array_equal(pairs[1][1], [False, True])
    np.testing.assert_allclose(pairs[2][0], [0.2])  # round 1 never verified position 3
    rows = position_reliability(conf, flags, np.array([3, 2]), bins=20)
    assert [r.count for r in rows] == [2, 2, 1]
    assert rows[0].mean_label == 1.0 and rows[2].mean_label == 0.0
    assert weighted_mean(rows, "ece") == pytest.approx(sum(r.ece * r.count for r in rows) / 5)
    from dspark_jax.evaluation.reliability import survival_ece
    ece, floor, same_pairs = survival_ece(conf, flags, np.array([3, 2]), bins=20, floor_positions=2)
    assert ece == pytest.approx([r.ece for r in rows]) and floor == pytest.approx([r.ece_floor for r in rows[:2]])
    assert len(same_pairs) == 3 and np.allclose(same_pairs[1][0], [0.4, 0.45])
    assert len(survival_ece(conf, flags, np.array([3, 2]), bins=20)[1]) == 3  # a floor at every position by default


def test_ece_noise_floor_matches_the_binomial_expectation_and_falls_with_the_sample():
    # every prediction 0.5 lies in one bin: ECE = |mean label − 0.5|, whose mean over Bernoulli(0.5) labels is
    # ≈ √(0.25 / n) · √(2 / π) (the mean absolute value of a normal)
    for n in (100, 400, 1600):
        expected = np.sqrt(0.25 / n) * np.sqrt(2 / np.pi)
        assert ece_noise_floor(np.full(n, 0.5), draws=2000) == pytest.approx(expected, rel=0.08)
    pred = np.random.default_rng(1).uniform(0.05, 0.95, 4000)
    assert ece_noise_floor(pred) < ece_noise_floor(pred[:1000])  # more rounds, less noise
    assert ece_noise_floor(pred) == ece_noise_floor(pred)  # seeded: a report repeats
    assert ece_noise_floor(np.zeros(50)) == 0.0 and np.isnan(ece_noise_floor(np.zeros(0)))
    rows = position_reliability(np.full((400, 1), 0.5), np.ones((400, 1), bool), np.ones(400, int))
    assert rows[0].ece == pytest.approx(0.5)
    assert rows[0].ece_floor == pytest.approx(ece_noise_floor(np.full(400, 0.5)))


def test_threshold_sweep_truncates_at_first_low_confidence():
    conf = np.array([[0.9, 0.4, 0.9], [0.3, 0.9, 0.9], [0.9, 0.9, 0.9]])
    r = make_records(request=[0, 1, 2], proposed=[3, 3, 3], accepted=[1, 3, 2], committed=[2, 4, 3],
                     confidence=conf)
    p0, p5 = threshold_sweep(r, [0.0, 0.5])
    assert p0.verified_per_round == 3 and p0.accepted_per_round == pytest.approx(2)
    assert p0.acceptance_rate == pytest.approx(6 / 9)
    # t = 0.5 cuts round 0 after 1 token, round 1 before any, round 2 not at all
    assert p5.verified_per_round == pytest.approx((1 + 0 + 3) / 3)
    assert p5.accepted_per_round == pytest.approx((1 + 0 + 2) / 3)
    assert p5.rejected_per_round == pytest.approx(1 / 3)
    assert p5.acceptance_rate == pytest.approx(3 / 4) and p5.accept_length == pytest.approx(2.0)
    with pytest.raises(ValueError, match="thresholds"):
        threshold_sweep(r, [1.5])


def test_records_concatenate_keeps_requests_distinct():
    a = make_records(request=[0, 0, 1], proposed=[3] * 3, accepted=[0] * 3, committed=[1] * 3)
    b = make_records(request=[0, 1], proposed=[3] * 2, accepted=[0] * 2, committed=[1] * 2)
    both = RoundRecords.concatenate([a, b])
    np.testing.assert_array_equal(both.request, [0, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="rows"):
        RoundRecords(request=np.zeros(2), proposed=np.zeros(3), accepted=np.zeros(2), committed=np.zeros(2),
                     accept_flags=np.zeros((2, 3), bool), confidence=np.zeros((2, 3)),
                     confidence_logits=np.zeros((2, 3)), model_forward=np.zeros(2, bool),
                     lookup_draft=np.zeros(2, bool), lookup_expected=np.zeros(2))


def test_records_round_trip_through_arrays(tmp_path):
    r = make_records(request=[0, 0, 1], proposed=[3] * 3, accepted=[1, 0, 2], committed=[2, 1, 3])
    np.savez(tmp_path / "r.npz", **r.to_arrays("0/a/"))
    with np.load(tmp_path / "r.npz") as saved:
        back = RoundRecords.from_arrays(saved, "0/a/")
    for name in ("request", "accepted", "accept_flags", "confidence", "lookup_expected"):
        np.testing.assert_array_equal(getattr(back, name), getattr(r, name))
    with pytest.raises(ValueError, match="missing lookup_draft, lookup_expected"):
        RoundRecords.from_arrays({k: v for k, v in r.to_arrays().items() if not k.startswith("lookup")})

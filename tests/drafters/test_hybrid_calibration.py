"""A hybrid's row calibration (`drafters.hybrid_calibration`): the map against hand-computed values, the fit
recovering known weights, the drafter directory round trip, and the hybrid verifying the same drafts with it on
(greedy output = plain decoding's) while its confidences are the map's."""
from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.drafters.hybrid_calibration import (FEATURES, LEGACY_FEATURES, MAX_TEMPERATURE, calibrated_rows,
                                                     row_features)

WEIGHTS = (0.1, 1.0, -0.2, 0.3, 0.5, 1.5, 0.05, -0.4, -1.2, 1.8, 0.4, -0.6, -0.7, 1.1)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logit(c: float) -> float:
    return math.log(c / (1.0 - c))


def test_the_map_against_hand_computed_values():
    conf = jnp.asarray([[0.6, 0.5, 0.0], [0.3, 0.2, 0.4], [0.3, 0.2, 0.4]], jnp.float32)
    lookup_row = jnp.asarray([True, False, False])
    expected_len = jnp.asarray([1.2, 0.5, 0.0], jnp.float32)
    out = np.asarray(calibrated_rows(conf, lookup_row, expected_len, jnp.asarray([2, 3, 3]), jnp.zeros(3), WEIGHTS))
    (lb, ll, lfb, lfl, mb, ml, mfb, mfl, match, match_e, lu, lu3, mu, mu3) = WEIGHTS
    # row 0, a lookup row: position 1 reads the first-position terms; its third position lies past its match
    assert out[0, 0] == pytest.approx(_sigmoid(lb + ll * _logit(0.6) + lfb + lfl * _logit(0.6) + lu * 0.2
                                               + lu3 * 0.2 ** 3), rel=1e-5)
    assert out[0, 1] == pytest.approx(_sigmoid(lb + ll * _logit(0.5)), rel=1e-5)  # u = 2c - 1 = 0
    assert out[0, 2] == 0.0
    # row 1, a model row whose lookup had a match (E_L 0.5): the match terms; row 2: no match
    for k, c in enumerate([0.3, 0.2, 0.4]):
        first = k == 0
        u = 2 * c - 1
        base = mb + ml * _logit(c) + first * (mfb + mfl * _logit(c)) + mu * u + mu3 * u ** 3
        assert out[1, k] == pytest.approx(_sigmoid(base + match + match_e * math.log1p(0.5)), rel=1e-5)
        assert out[2, k] == pytest.approx(_sigmoid(base), rel=1e-5)
    assert row_features(conf, lookup_row, expected_len).shape == (3, 3, len(FEATURES))
    # hotter requests keep their confidences
    hot = calibrated_rows(conf, lookup_row, expected_len, jnp.asarray([2, 3, 3]),
                          jnp.asarray([0.0, MAX_TEMPERATURE + 0.1, 1.0]), WEIGHTS)
    np.testing.assert_array_equal(np.asarray(hot)[1:], np.asarray(conf)[1:])
    with pytest.raises(ValueError, match="weights"):
        calibrated_rows(conf, lookup_row, expected_len, jnp.asarray([2, 3, 3]), jnp.zeros(3), WEIGHTS[:3])


def test_the_fit_recovers_the_weights_it_was_drawn_from():
    from dspark_jax.evaluation.calibration import fit_hybrid_row_calibration
    rng = np.random.default_rng(0)
    n, g = 80_000, 4
    conf = rng.uniform(0.05, 0.95, (n, g)).astype(np.float32)
    lookup_row = rng.random(n) < 0.5
    expected_len = np.where(rng.random(n) < 0.5, rng.uniform(0.1, 3.0, n), 0.0).astype(np.float32)
    true = np.asarray(calibrated_rows(jnp.asarray(conf), jnp.asarray(lookup_row), jnp.asarray(expected_len),
                                      jnp.full((n,), g), jnp.zeros(n), WEIGHTS))
    flags = rng.random((n, g)) < true
    accepted = np.where(flags.all(1), g, np.argmin(flags, axis=1))  # leading accepted drafts
    weights = fit_hybrid_row_calibration(conf, lookup_row, expected_len, accepted, np.full(n, g), l2=1e-3)
    # the map is recovered (the centered terms are nearly collinear with the logit's, so single weights may trade
    # off against each other within the sampling noise, the map they make may not)
    fitted = np.asarray(calibrated_rows(jnp.asarray(conf), jnp.asarray(lookup_row), jnp.asarray(expected_len),
                                        jnp.full((n,), g), jnp.zeros(n), tuple(weights)))
    np.testing.assert_allclose(fitted, true, atol=0.03)
    np.testing.assert_allclose(weights[:4], WEIGHTS[:4], atol=0.25)  # ... and the bias and logit weights roughly
    with pytest.raises(ValueError, match="both sources"):
        fit_hybrid_row_calibration(conf, np.ones(n, bool), expected_len, accepted, np.full(n, g))


def _saved_drafter(tmp_path):
    from dspark_jax.drafters.checkpoint import save_drafter
    from dspark_jax.drafters.factory import random_drafter
    from dspark_jax.testing.tiny_target import make_tiny_target
    target = make_tiny_target()
    model = random_drafter(target, "dspark", gamma=3, num_layers=1)
    return target, save_drafter(nnx.merge(model.graphdef, model.state), tmp_path / "d")


def test_a_drafter_directory_keeps_the_weights(tmp_path):
    from dspark_jax.drafters.checkpoint import (DrafterFileError, hybrid_row_calibration, read_meta,
                                                write_hybrid_row_calibration)
    _, d = _saved_drafter(tmp_path)
    before = read_meta(d)
    assert hybrid_row_calibration(d) is None
    write_hybrid_row_calibration(d, dict(weights=list(WEIGHTS), rounds=12))
    assert hybrid_row_calibration(d) == pytest.approx(WEIGHTS)
    after = read_meta(d)
    assert after["hybrid_calibration"]["rounds"] == 12 and after["hybrid_calibration"]["features"] == list(FEATURES)
    assert {k: v for k, v in after.items() if k != "hybrid_calibration"} == before
    for bad in ([float("nan")] * len(FEATURES), [1.0]):
        with pytest.raises(ValueError, match="finite weights"):
            write_hybrid_row_calibration(d, dict(weights=bad))
    assert hybrid_row_calibration(d) == pytest.approx(WEIGHTS)  # a refused write leaves the file as it was
    assert sorted(p.name for p in d.iterdir()) == ["drafter.json", "drafter.safetensors"]  # no temporary left
    # a copy (`dspark calibrate --hybrid --output`): the source untouched, an existing copy replaced whole
    out = tmp_path / "copies" / "out"
    for weights in (np.zeros(len(FEATURES)), np.ones(len(FEATURES))):
        assert write_hybrid_row_calibration(d, dict(weights=list(weights)), dst=out) == out
        assert hybrid_row_calibration(out) == pytest.approx(weights)
        assert (out / "drafter.safetensors").read_bytes() == (d / "drafter.safetensors").read_bytes()
    assert hybrid_row_calibration(d) == pytest.approx(WEIGHTS)
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # nothing temporary or aside left
    with pytest.raises(ValueError, match="finite weights"):
        write_hybrid_row_calibration(d, dict(weights=[1.0]), dst=out)
    assert hybrid_row_calibration(out) == pytest.approx(np.ones(len(FEATURES)))
    assert write_hybrid_row_calibration(d, dict(weights=list(WEIGHTS)), dst=d) == d  # dst = the source: in place
    # session 44's record (ten features) loads as the same map: the later features weigh 0
    meta = read_meta(d)
    meta["hybrid_calibration"] = dict(weights=list(WEIGHTS[:len(LEGACY_FEATURES)]), features=list(LEGACY_FEATURES))
    (d / "drafter.json").write_text(json.dumps(meta))
    assert hybrid_row_calibration(d) == pytest.approx(WEIGHTS[:len(LEGACY_FEATURES)]
                                                      + (0.0,) * (len(FEATURES) - len(LEGACY_FEATURES)))
    meta["hybrid_calibration"]["weights"] = list(WEIGHTS)  # ten features named, fourteen weights
    (d / "drafter.json").write_text(json.dumps(meta))
    with pytest.raises(DrafterFileError, match="features"):
        hybrid_row_calibration(d)
    meta["hybrid_calibration"]["features"] = ["bias"]
    (d / "drafter.json").write_text(json.dumps(meta))
    with pytest.raises(DrafterFileError, match="features"):
        hybrid_row_calibration(d)


def test_the_calibrated_hybrid_verifies_the_same_drafts_with_the_mapped_confidences():
    """With the map on, greedy output equals plain decoding's, every round verifies the same drafts as without it,
    and each round's recorded confidences are the map of the uncalibrated run's (same rows, same lookup state)."""
    from tests.decoding.test_speculative import make_target
    from tests.drafters.test_ngram import REPETITIVE, _hybrid, greedy_plain_and_speculative
    tg, ts, cfg = make_target("gemma3")
    off, on = (greedy_plain_and_speculative(tg, ts, *_hybrid(cfg, 3, row_calibration=w), REPETITIVE, 20)[1]
               for w in (None, WEIGHTS))
    for field in ("tokens", "num_tokens", "rounds", "proposed", "accepted", "lookup_draft", "lookup_expected"):
        np.testing.assert_array_equal(np.asarray(getattr(on, field)), np.asarray(getattr(off, field)), err_msg=field)
    rounds = np.asarray(off.rounds)
    b = np.repeat(np.arange(len(rounds)), rounds)
    r = np.concatenate([np.arange(n) for n in rounds])
    lookup_row = np.asarray(off.lookup_draft)[b, r]
    assert 0 < lookup_row.sum() < len(b)  # both sources verified somewhere
    conf_off = np.asarray(off.confidence)[b, r]
    expected = np.asarray(calibrated_rows(jnp.asarray(conf_off), jnp.asarray(lookup_row),
                                          jnp.asarray(np.asarray(off.lookup_expected)[b, r]),
                                          jnp.full((len(b),), conf_off.shape[1]), jnp.zeros(len(b)), WEIGHTS))
    drafted = np.asarray(off.confidence)[b, r] > 0  # past a lookup's match c stays 0 (its proposal's length)
    np.testing.assert_allclose(np.asarray(on.confidence)[b, r][drafted], expected[drafted], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="row_calibration"):
        _hybrid(cfg, 3, row_calibration=(1.0, 2.0))


def test_the_spec_turns_the_shipped_row_calibration_off(tmp_path):
    from dspark_jax.drafters.checkpoint import write_hybrid_row_calibration
    from dspark_jax.drafters.factory import load_drafter
    target, d = _saved_drafter(tmp_path)
    plain = load_drafter(f"{d}+ngram", target, gamma=3)
    assert plain.config.row_calibration is None  # nothing fitted
    write_hybrid_row_calibration(d, dict(weights=list(WEIGHTS)))
    on = load_drafter(f"{d}+ngram", target, gamma=3)
    assert on.config.row_calibration == pytest.approx(WEIGHTS) and on.source == f"{d}+ngram"
    off = load_drafter(f"{d}+ngram:row_calibration=0", target, gamma=3)
    assert off.config.row_calibration is None and off.source.endswith(":row_calibration=0")
    with pytest.raises(ValueError, match="row_calibration is 0 or 1"):
        load_drafter(f"{d}+ngram:row_calibration=2", target, gamma=3)

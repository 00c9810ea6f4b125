"""Sequential Temperature Scaling: it calibrates an overconfident synthetic head (lower ECE, same per-position
order, AUC kept), leaves positions without enough outcomes alone, and the fitted temperatures round-trip
through a drafter directory into `ConfidenceHead.calibrated`."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.testing.tiny_configs import tiny_gemma3
from dspark_jax.drafters.checkpoint import (META_FILE, WEIGHTS_FILE, DrafterFileError, load_drafter_module,
                                            save_drafter, write_temperatures)
from dspark_jax.drafters.config import make_drafter_config
from dspark_jax.drafters.dspark import DSparkDrafter
from dspark_jax.drafters.factory import Drafter, with_confidence_temperatures
from dspark_jax.evaluation.calibration import (STSConfig, cross_fitted_ece, fit_sequential_scale_and_bias,
                                               fit_sequential_temperatures, golden_section_minimize,
                                               sequential_scale_and_bias, sequential_temperature_scaling,
                                               survival_confidences)
from dspark_jax.evaluation.reliability import expected_calibration_error, survival_pairs

G = 4


def overconfident_rollouts(n=6000, scale=3.0, seed=0):
    """True conditional acceptance σ(s_k); the head reports z_k = scale · s_k (overconfident for scale > 1).
    Flags follow the chain rule: position k is accepted only if 1..k-1 were."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0.3, 1.2, (n, G))
    accepted_each = rng.random((n, G)) < 1 / (1 + np.exp(-s))
    flags = np.cumprod(accepted_each, axis=1).astype(bool)
    return scale * s, flags, np.full(n, G)


def test_sts_lowers_ece_keeps_order_and_auc():
    z, flags, proposed = overconfident_rollouts()
    result = sequential_temperature_scaling(z, flags, proposed)
    temps = np.array(result.temperatures)
    assert all(result.fitted)
    assert 2.0 < temps[0] < 4.5  # the true temperature is 3
    for b, a in zip(result.before, result.after):
        assert a.ece < b.ece and a.ece < 0.03, (b, a)
        assert abs(a.auc - b.auc) < 0.02
    c_raw, c_cal = survival_confidences(z, np.ones(G)), survival_confidences(z, temps)
    for k in range(G):  # a positive temperature never reorders a position's confidences
        order = np.argsort(z[:, k], kind="stable")
        assert (np.diff(c_cal[order, k]) >= 0).all() and (np.diff(c_raw[order, k]) >= 0).all()


def test_a_per_position_bias_fits_what_a_temperature_cannot():
    """Acceptance σ(z_k / T_k + β_k) with biases: the scale-and-bias fit recovers (T_k, β_k) and a calibrated
    survival (ECE < 2 % at every position), while STS, a temperature only, stays off at the biased positions."""
    true_t, true_b = np.array([1.0, 0.5, 2.0, 1.0]), np.array([-1.0, 0.8, -0.6, 0.0])
    rng = np.random.default_rng(2)
    z = rng.normal(0.5, 2.0, (20000, G))
    flags = np.cumprod(rng.random(z.shape) < survival_confidences(z, true_t, true_b), axis=1).astype(bool)
    proposed = np.full(len(z), G)
    temps, biases = fit_sequential_scale_and_bias(z, flags, proposed)
    np.testing.assert_allclose(temps, true_t, rtol=0.15)
    np.testing.assert_allclose(biases, true_b, atol=0.15)
    both, sts = sequential_scale_and_bias(z, flags, proposed), sequential_temperature_scaling(z, flags, proposed)
    assert both.biases == tuple(biases) and sts.biases == (0.0,) * G
    assert all(a.ece < 0.02 for a in both.after), both.after
    assert max(a.ece for a in sts.after) > 0.03 > max(a.ece for a in both.after)
    few = flags.copy()
    few[:, 2:] = False  # nobody survives past position 2: T = 1, β = 0 kept there
    t_few, b_few = fit_sequential_scale_and_bias(z, few, proposed)
    assert (t_few[2:] == 1.0).all() and (b_few[2:] == 0.0).all() and b_few[0] != 0.0


def test_cross_fitted_ece_fits_on_one_half_of_the_requests_and_scores_the_other():
    z, flags, proposed = overconfident_rollouts(n=4000)
    request = np.arange(len(z)) // 10  # 400 requests of 10 rounds each
    seen = []

    def raw_head(zf, ff, pf):  # no fit: the raw head's confidences, and a record of what it was given
        seen.append(len(zf))
        return np.ones(G), None

    raw = cross_fitted_ece(z, flags, proposed, request, raw_head)
    odd = request % 2 == 1
    expected = [expected_calibration_error(p, y) for p, y in
                survival_pairs(survival_confidences(z[odd], np.ones(G)), flags[odd], proposed[odd])]
    assert seen == [2000, 2000] and raw[0]["rounds_scored"] == 2000 and raw[0]["biases"] is None
    np.testing.assert_allclose(raw[0]["ece"], expected)  # fitted on the even requests, scored on the odd ones
    fitted = cross_fitted_ece(z, flags, proposed, request, fit_sequential_scale_and_bias)
    for half in (0, 1):  # the overconfident head, calibrated out of sample
        assert max(fitted[half]["ece"]) < 0.5 * max(raw[half]["ece"]), (fitted[half], raw[half])
        assert len(fitted[half]["biases"]) == len(fitted[half]["floor"]) == G


def test_positions_without_enough_outcomes_keep_temperature_one():
    z, flags, proposed = overconfident_rollouts(n=500)
    flags[:, 2:] = False  # nobody survives past position 2
    temps = fit_sequential_temperatures(z, flags, proposed, STSConfig(min_class_count=5))
    assert temps[2] == 1.0 and temps[3] == 1.0 and temps[0] != 1.0


def test_only_verified_positions_count():
    z, flags, proposed = overconfident_rollouts(n=2000)
    proposed[:1000] = 1  # half the rounds verified one position only (a threshold cut them)
    fitted = fit_sequential_temperatures(z, flags, proposed)
    rng = np.random.default_rng(1)
    z2, flags2 = z.copy(), flags.copy()
    z2[:1000, 1:] = rng.normal(0, 5, (1000, G - 1))  # what lies past a cut must not matter
    flags2[:1000, 1:] = rng.random((1000, G - 1)) < 0.5
    np.testing.assert_array_equal(fit_sequential_temperatures(z2, flags2, proposed), fitted)


def test_golden_section_minimize():
    assert golden_section_minimize(lambda x: (x - 0.7) ** 2, -2, 3, 60) == pytest.approx(0.7, abs=1e-6)
    with pytest.raises(ValueError):
        STSConfig(t_min=2.0, t_max=1.0)


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory):
    cfg = tiny_gemma3()
    dc = make_drafter_config("dspark", cfg, block_size=G, num_layers=1, markov_rank=8)
    module = DSparkDrafter(dc, cfg, rngs=nnx.Rngs(3))
    path = save_drafter(module, tmp_path_factory.mktemp("drafter") / "d", dtype=jnp.float32, extra=dict(note="x"))
    return cfg, path


def test_temperatures_round_trip_through_a_drafter_directory(drafter_dir, tmp_path):
    cfg, src = drafter_dir
    temps = [0.5, 2.0, 3.0, 0.25]
    out = write_temperatures(src, tmp_path / "calibrated", temps, dict(method="sts", temperatures=temps))
    before, after = load_drafter_module(src, cfg), load_drafter_module(out, cfg)
    np.testing.assert_array_equal(np.asarray(after.confidence.temperatures[...]), np.float32(temps))
    z = jnp.array([[0.7, -1.2, 2.0, 0.3]])
    np.testing.assert_allclose(np.asarray(after.confidence.calibrated(z)),
                               1 / (1 + np.exp(-np.asarray(z) / np.float32(temps))), rtol=1e-6)
    assert not np.allclose(np.asarray(after.confidence.calibrated(z)), np.asarray(before.confidence.calibrated(z)))
    # every other tensor is copied unchanged; the calibration is recorded next to the old metadata
    for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(before)), nnx.to_flat_state(nnx.state(after))):
        if "temperatures" not in p1:
            np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))
    meta = json.loads((out / META_FILE).read_text())
    assert meta["calibration"]["temperatures"] == temps and meta["note"] == "x"


def test_biases_round_trip_and_files_without_them_load_with_zeros(drafter_dir, tmp_path):
    from safetensors.numpy import load_file, save_file
    cfg, src = drafter_dir
    temps, biases = [0.5, 2.0, 3.0, 0.25], [-0.5, 0.25, 0.0, 1.5]
    out = write_temperatures(src, tmp_path / "calibrated", temps, {}, biases)
    head = load_drafter_module(out, cfg).confidence
    np.testing.assert_array_equal(np.asarray(head.biases[...]), np.float32(biases))
    assert load_file(str(out / WEIGHTS_FILE))["confidence/biases"].dtype == np.float32
    z = jnp.array([[0.7, -1.2, 2.0, 0.3]])
    np.testing.assert_allclose(np.asarray(head.calibrated(z)),
                               survival_confidences(np.asarray(z), np.float32(temps), np.float32(biases)), rtol=1e-6)
    old = tmp_path / "old"  # a drafter file written before the bias existed
    old.mkdir()
    (old / META_FILE).write_text((out / META_FILE).read_text())
    tensors = load_file(str(out / WEIGHTS_FILE))
    del tensors["confidence/biases"]
    save_file(tensors, str(old / WEIGHTS_FILE))
    np.testing.assert_array_equal(np.asarray(load_drafter_module(old, cfg).confidence.biases[...]), 0.0)
    with pytest.raises(ValueError, match="biases must be"):
        write_temperatures(src, tmp_path / "bad", temps, {}, [0.0, np.nan, 0.0, 0.0])


def test_write_temperatures_in_place_and_bad_input(drafter_dir, tmp_path):
    import shutil
    cfg, src = drafter_dir
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    write_temperatures(copy, copy, [2.0] * G, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temporary directories left behind
    assert sorted(p.name for p in copy.iterdir()) == sorted([META_FILE, WEIGHTS_FILE])
    assert [oct(p.stat().st_mode & 0o777) for p in (copy, copy / META_FILE, copy / WEIGHTS_FILE)] == \
        ["0o755", "0o644", "0o644"]  # readable by a serving user other than the one who calibrated
    np.testing.assert_array_equal(np.asarray(load_drafter_module(copy, cfg).confidence.temperatures[...]), 2.0)
    with pytest.raises(ValueError, match="positive"):
        write_temperatures(copy, copy, [1.0, -1.0, 1.0, 1.0], {})
    with pytest.raises(ValueError, match="positive"):
        write_temperatures(copy, copy, [1.0] * (G + 1), {})
    dflash = DSparkDrafter(make_drafter_config("dflash", cfg, block_size=G, num_layers=1), cfg, rngs=nnx.Rngs(0))
    no_head = save_drafter(dflash, tmp_path / "dflash", dtype=jnp.float32)
    with pytest.raises(DrafterFileError, match="no confidence head"):
        write_temperatures(no_head, tmp_path / "out", [1.0] * G, {})


def test_with_confidence_temperatures(drafter_dir):
    cfg, src = drafter_dir
    module = load_drafter_module(src, cfg)
    graphdef, state = nnx.split(module)
    d = Drafter(module.config, graphdef, state, str(src))
    changed = with_confidence_temperatures(d, [4.0] * G)
    head = nnx.merge(changed.graphdef, changed.state).confidence
    np.testing.assert_array_equal(np.asarray(head.temperatures[...]), 4.0)
    with pytest.raises(ValueError, match="positive"):
        with_confidence_temperatures(d, [0.0] * G)
    biased = nnx.merge(*(lambda x: (x.graphdef, x.state))(with_confidence_temperatures(d, [1.0] * G, [0.5] * G)))
    np.testing.assert_array_equal(np.asarray(biased.confidence.biases[...]), 0.5)
    np.testing.assert_array_equal(np.asarray(head.biases[...]), 0.0)  # biases None: zeros
    np.testing.assert_array_equal(np.asarray(head.temperatures[...]), 4.0)  # earlier results are not aliased
    np.testing.assert_array_equal(np.asarray(nnx.merge(d.graphdef, d.state).confidence.temperatures[...]),
                                  np.asarray(module.confidence.temperatures[...]))  # nor the input drafter
    with pytest.raises(ValueError, match="biases must be"):
        with_confidence_temperatures(d, [1.0] * G, [0.5] * (G + 1))


def test_drafters_are_written_as_real_bf16_safetensors_and_format_1_still_loads(tmp_path):
    """Format 2: BF16 tensors any safetensors reader understands; a format-1 directory (uint16 bit patterns under
    '<name>:bf16') loads to the same weights."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from dspark_jax.utils.bfloat16 import BFLOAT16
    cfg = tiny_gemma3()
    module = DSparkDrafter(make_drafter_config("dspark", cfg, block_size=G, num_layers=1, markov_rank=8), cfg,
                           rngs=nnx.Rngs(4))
    path = save_drafter(module, tmp_path / "bf16")
    with safe_open(str(path / WEIGHTS_FILE), framework="np") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes["fc"] == "BF16" and dtypes["confidence/temperatures"] == "F32"
    loaded = load_drafter_module(path, cfg)
    want = np.asarray(jnp.asarray(module.fc[...]).astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(loaded.fc[...]), want)  # rounded once, to nearest even
    # the same drafter in format 1
    old = tmp_path / "format1"
    old.mkdir()
    tensors = {(f"{n}:bf16" if a.dtype == BFLOAT16 else n): (a.view(np.uint16) if a.dtype == BFLOAT16 else a)
               for n, a in load_file(str(path / WEIGHTS_FILE)).items()}
    save_file(tensors, str(old / WEIGHTS_FILE))
    meta = json.loads((path / META_FILE).read_text())
    assert meta["format_version"] == 2
    (old / META_FILE).write_text(json.dumps(dict(meta, format_version=1)))
    for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(loaded)),
                                  nnx.to_flat_state(nnx.state(load_drafter_module(old, cfg)))):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))
    (old / META_FILE).write_text(json.dumps(dict(meta, format_version=3)))
    with pytest.raises(DrafterFileError, match="unsupported drafter format version 3"):
        load_drafter_module(old, cfg)


def test_calibration_sets_one_per_sampling_temperature(drafter_dir, tmp_path):
    from dspark_jax.drafters.checkpoint import calibration_sets
    cfg, src = drafter_dir
    rng = np.random.default_rng(0)
    t0, t1, t1b, th = (rng.uniform(0.5, 2.0, G).tolist() for _ in range(4))
    b0, b1 = rng.uniform(-1.0, 1.0, G).tolist(), rng.uniform(-1.0, 1.0, G).tolist()
    assert calibration_sets(src) == []  # an uncalibrated head has no set (its identity is not kept as one)
    at0 = write_temperatures(src, tmp_path / "at0", t0, dict(sampling_temperature=0.0), b0, keep_other_sets=True)
    both = write_temperatures(at0, tmp_path / "both", t1, dict(sampling_temperature=1.0), b1, keep_other_sets=True)
    sets = calibration_sets(both)
    assert [s.sampling_temperature for s in sets] == [0.0, 1.0]
    np.testing.assert_array_equal(sets[1].temperatures, np.float32(t1))
    head = load_drafter_module(both, cfg).confidence
    np.testing.assert_array_equal(np.asarray(head.calibrated_at[...]), [0.0, 1.0])
    z = jnp.asarray(rng.normal(size=(4, G)), jnp.float32)
    at = jnp.array([0.0, 0.4, 0.7, 2.0])  # nearest set: 0, 0, 1, 1
    want = np.stack([survival_confidences(np.asarray(z[i:i + 1]), np.float32(t), np.float32(b))[0]
                     for i, (t, b) in enumerate([(t0, b0), (t0, b0), (t1, b1), (t1, b1)])])
    np.testing.assert_allclose(np.asarray(head.calibrated(z, at)), want, rtol=1e-6)
    with pytest.raises(ValueError, match="sampling temperature"):
        head.calibrated(z)
    # recalibrating at T = 1 replaces that set; another temperature is inserted in order; without keeping, one set
    again = write_temperatures(both, tmp_path / "again", t1b, dict(sampling_temperature=1.0), keep_other_sets=True)
    assert [s.sampling_temperature for s in calibration_sets(again)] == [0.0, 1.0]
    np.testing.assert_array_equal(calibration_sets(again)[1].temperatures, np.float32(t1b))
    three = write_temperatures(again, tmp_path / "three", th, dict(sampling_temperature=0.5), keep_other_sets=True)
    assert [s.sampling_temperature for s in calibration_sets(three)] == [0.0, 0.5, 1.0]
    assert len(json.loads((three / META_FILE).read_text())["calibrations"]) == 3
    one = write_temperatures(three, tmp_path / "one", t1, dict(sampling_temperature=1.0))
    assert np.asarray(load_drafter_module(one, cfg).confidence.temperatures[...]).shape == (G,)
    with pytest.raises(ValueError, match="sampling_temperature"):
        write_temperatures(src, tmp_path / "bad", t0, dict(sampling_temperature=-1.0))


def test_drafter_files_with_broken_calibration_sets_are_refused(drafter_dir, tmp_path):
    from safetensors.numpy import load_file, save_file
    cfg, src = drafter_dir
    both = write_temperatures(write_temperatures(src, tmp_path / "a", [1.0] * G, dict(sampling_temperature=0.0)),
                              tmp_path / "both", [2.0] * G, dict(sampling_temperature=1.0), keep_other_sets=True)
    tensors = load_file(str(both / WEIGHTS_FILE))
    for name, value, match in (("confidence/calibrated_at", np.float32([1.0, 0.0]), "ascending"),
                               ("confidence/calibrated_at", np.float32([0.0]), "ascending"),
                               ("confidence/biases", np.zeros((3, G), np.float32), "expected"),
                               ("confidence/temperatures", np.zeros((2, G), np.float32), "positive")):
        bad = tmp_path / f"bad_{name.split('/')[1]}_{value.size}"
        bad.mkdir()
        (bad / META_FILE).write_text((both / META_FILE).read_text())
        save_file(dict(tensors, **{name: value}), str(bad / WEIGHTS_FILE))
        with pytest.raises(DrafterFileError, match=match):
            load_drafter_module(bad, cfg)

"""Sequential Temperature Scaling (paper §3.2.1): calibrate the predicted prefix survival Π_{i<=k} σ(z_i/T_i).

For k = 1..G left to right, with T_1..T_{k-1} fixed, T_k minimises the ECE of the cumulative product against
the realised survival "first k draft tokens accepted", over the held-out rounds that verified position k:
a 1-D search over log-spaced temperatures, then golden-section refinement between the best grid point's
neighbours. A position with fewer than `min_class_count` survivals or failures keeps T_k = 1 (an extreme
temperature fitted to a handful of outcomes would push c_k to 0 or 1). A positive temperature keeps the
order of σ(z_k/T_k) at each position; the cumulative product's order across rounds can still change a
little (its ROC-AUC is reported before and after).

`sequential_scale_and_bias` (a deviation from the paper, `dspark calibrate --bias`) fits c_k = σ(z_k / T_k + β_k)
left to right in the same way, (T_k, β_k) maximising the likelihood of the realised survival: a temperature
alone cannot shift a survival curve that is off in one direction at every confidence (BENCHMARKS.md "Session 17": held-out
ECE at positions 2–7 of 7–9 % with STS, 3–4 % with the bias, fitted and scored on disjoint requests).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from dspark_jax.evaluation.reliability import (DEFAULT_BINS, PositionReliability, ece_noise_floor,
                                               expected_calibration_error, position_reliability, survival_pairs)


@dataclasses.dataclass(frozen=True)
class STSConfig:
    t_min: float = 0.05
    t_max: float = 20.0
    grid_points: int = 121
    refine_iterations: int = 40
    bins: int = DEFAULT_BINS
    min_class_count: int = 5

    def __post_init__(self):
        if not 0 < self.t_min < self.t_max:
            raise ValueError(f"need 0 < t_min < t_max, got {self.t_min}, {self.t_max}")
        if self.grid_points < 3 or self.bins < 1 or self.refine_iterations < 0 or self.min_class_count < 0:
            raise ValueError("grid_points >= 3, bins >= 1, refine_iterations >= 0 and min_class_count >= 0 are "
                             "required")


@dataclasses.dataclass(frozen=True)
class STSResult:
    temperatures: tuple[float, ...]
    fitted: tuple[bool, ...]  # False: too few survivals or failures at that position, T_k kept at 1 (β_k at 0)
    before: list[PositionReliability]  # raw head (all T = 1, β = 0)
    after: list[PositionReliability]  # with the fitted temperatures (and biases)
    biases: tuple[float, ...]  # per-position β_k: zeros for STS


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def survival_confidences(logits: np.ndarray, temperatures: np.ndarray, biases: np.ndarray | None = None
                         ) -> np.ndarray:
    """c_k = σ(z_k / T_k + β_k) for logits [N, G] (float64; biases None: 0)."""
    x = np.asarray(logits, np.float64) / np.asarray(temperatures, np.float64)
    return np.exp(_log_sigmoid(x if biases is None else x + np.asarray(biases, np.float64)))


def golden_section_minimize(f: Callable[[float], float], lo: float, hi: float, iterations: int) -> float:
    """x in [lo, hi] with (locally) smallest f(x); f need not be smooth (ECE is piecewise constant)."""
    inv_phi = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return c if fc <= fd else d


def fittable_positions(accept_flags: np.ndarray, proposed: np.ndarray, min_class_count: int) -> np.ndarray:
    """[G] bool: positions whose verified rounds hold at least `min_class_count` survivals and failures."""
    flags = np.cumprod(np.asarray(accept_flags, bool), axis=1).astype(bool)
    verified = np.asarray(proposed)[:, None] > np.arange(flags.shape[1])[None]
    survived = (flags & verified).sum(0)
    return (survived >= min_class_count) & (verified.sum(0) - survived >= min_class_count)


def fit_sequential_temperatures(logits: np.ndarray, accept_flags: np.ndarray, proposed: np.ndarray,
                                config: STSConfig = STSConfig()) -> np.ndarray:
    """Temperatures [G] from held-out rounds: logits [N, G] raw confidence logits, accept_flags [N, G],
    proposed [N]. Positions that are not `fittable_positions` keep T = 1."""
    logits = np.asarray(logits, np.float64)
    flags = np.cumprod(np.asarray(accept_flags, bool), axis=1).astype(bool)
    proposed = np.asarray(proposed)
    g = logits.shape[1]
    temps = np.ones(g)
    log_prefix = np.zeros(len(logits))  # log Π_{i<k} σ(z_i / T_i) with the fitted T_i
    grid = np.log(np.geomspace(config.t_min, config.t_max, config.grid_points))
    fit = fittable_positions(flags, proposed, config.min_class_count)
    for k in range(g):
        rows = proposed > k
        z, label, prior = logits[rows, k], flags[rows, k], log_prefix[rows]
        if rows.any() and fit[k]:
            def ece_at(log_t: float) -> float:
                return expected_calibration_error(np.exp(prior + _log_sigmoid(z / math.exp(log_t))), label,
                                                  config.bins)

            scores = np.array([ece_at(x) for x in grid])
            best = scores.min()
            ties = np.flatnonzero(scores <= best + 1e-12)
            i = ties[np.argmin(np.abs(grid[ties]))]  # among equal ECEs the temperature closest to 1
            lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
            refined = golden_section_minimize(ece_at, lo, hi, config.refine_iterations)
            temps[k] = math.exp(refined if ece_at(refined) < best else grid[i])
        log_prefix = log_prefix + _log_sigmoid(logits[:, k] / temps[k])
    return temps


def sequential_temperature_scaling(logits: np.ndarray, accept_flags: np.ndarray, proposed: np.ndarray,
                                   config: STSConfig = STSConfig()) -> STSResult:
    """Fits the temperatures and reports per-position reliability before (T = 1) and after."""
    temps = fit_sequential_temperatures(logits, accept_flags, proposed, config)
    return _report(logits, accept_flags, proposed, config, temps, np.zeros_like(temps))


def _report(logits, accept_flags, proposed, config: STSConfig, temps: np.ndarray, biases: np.ndarray) -> STSResult:
    """The fitted temperatures and biases with per-position reliability before (T = 1, β = 0) and after."""
    before = position_reliability(survival_confidences(logits, np.ones_like(temps)), accept_flags, proposed,
                                  config.bins)
    after = position_reliability(survival_confidences(logits, temps, biases), accept_flags, proposed, config.bins)
    fitted = fittable_positions(accept_flags, proposed, config.min_class_count)
    return STSResult(temperatures=tuple(float(t) for t in temps), fitted=tuple(bool(f) for f in fitted),
                     before=before, after=after, biases=tuple(float(b) for b in biases))


def fit_sequential_scale_and_bias(logits: np.ndarray, accept_flags: np.ndarray, proposed: np.ndarray,
                                  config: STSConfig = STSConfig()) -> tuple[np.ndarray, np.ndarray]:
    """(temperatures [G], biases [G]) from held-out rounds (shapes as `fit_sequential_temperatures`): for k = 1..G,
    with the earlier positions fixed, (T_k, β_k) maximise the likelihood of the survival labels of the rounds that
    verified position k under Π_{i<=k} σ(z_i / T_i + β_i) (Nelder–Mead over (log T_k, β_k) from (0, 0); T_k
    clipped to [t_min, t_max]). Positions that are not `fittable_positions` keep T = 1, β = 0."""
    from scipy.optimize import minimize
    logits = np.asarray(logits, np.float64)
    flags = np.cumprod(np.asarray(accept_flags, bool), axis=1).astype(bool)
    proposed = np.asarray(proposed)
    g = logits.shape[1]
    temps, biases = np.ones(g), np.zeros(g)
    log_prefix = np.zeros(len(logits))
    fit = fittable_positions(flags, proposed, config.min_class_count)
    lo, hi = math.log(config.t_min), math.log(config.t_max)
    for k in range(g):
        rows = proposed > k
        z, label, prior = logits[rows, k], flags[rows, k], log_prefix[rows]
        if rows.any() and fit[k]:
            def nll(p):
                log_a = np.minimum(prior + _log_sigmoid(z / math.exp(np.clip(p[0], lo, hi)) + p[1]), -1e-12)
                return -np.mean(np.where(label, log_a, np.log(-np.expm1(log_a))))

            best = minimize(nll, np.zeros(2), method="Nelder-Mead",
                            options=dict(xatol=1e-6, fatol=1e-10, maxiter=4000)).x
            temps[k], biases[k] = math.exp(float(np.clip(best[0], lo, hi))), float(best[1])
        log_prefix = log_prefix + _log_sigmoid(logits[:, k] / temps[k] + biases[k])
    return temps, biases


def sequential_scale_and_bias(logits: np.ndarray, accept_flags: np.ndarray, proposed: np.ndarray,
                              config: STSConfig = STSConfig()) -> STSResult:
    """Fits temperatures and per-position biases (`fit_sequential_scale_and_bias`) and reports per-position
    reliability before (T = 1, β = 0) and after."""
    temps, biases = fit_sequential_scale_and_bias(logits, accept_flags, proposed, config)
    return _report(logits, accept_flags, proposed, config, temps, biases)


def cross_fitted_ece(logits: np.ndarray, accept_flags: np.ndarray, proposed: np.ndarray, request: np.ndarray,
                     fit: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray | None]],
                     bins: int = DEFAULT_BINS) -> list[dict]:
    """Out-of-sample ECE of a calibration family: `fit(logits, accept_flags, proposed) -> (temperatures,
    biases or None)` on the rounds of the requests with even (then odd) id, scored on the others — the ECE of
    the survival Π_{i<=k} c_i per position, with the noise floor at that many rounds (`ece_noise_floor`).
    Shapes as `fit_sequential_temperatures`, request [N] ints. Returns two dicts (fitted_on_half 0 / 1):
    ece [G], floor [G], rounds_fit, rounds_scored, temperatures [G], biases [G] or None."""
    logits, request = np.asarray(logits, np.float64), np.asarray(request)
    out = []
    for half in (0, 1):
        on, off = (request % 2) == half, (request % 2) != half
        temps, biases = fit(logits[on], accept_flags[on], proposed[on])
        pairs = survival_pairs(survival_confidences(logits[off], temps, biases), accept_flags[off], proposed[off])
        out.append(dict(fitted_on_half=half, ece=[expected_calibration_error(p, y, bins) for p, y in pairs],
                        floor=[ece_noise_floor(p, bins) for p, _ in pairs], rounds_fit=int(on.sum()),
                        rounds_scored=int(off.sum()), temperatures=np.asarray(temps).tolist(),
                        biases=None if biases is None else np.asarray(biases).tolist()))
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50) -> np.ndarray:
    """[F] weights w of P(y) = σ(x · w): Newton's method on the log-likelihood with an L2 penalty `l2` (every
    weight, the bias column included). x [N, F]; y [N] bool."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        step = np.linalg.solve((x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(w)), x.T @ (p - y) + l2 * w)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w


def fit_hybrid_row_calibration(confidence: np.ndarray, lookup_row: np.ndarray, lookup_expected: np.ndarray,
                               accepted: np.ndarray, proposed: np.ndarray, l2: float = 1.0,
                               num_features: int | None = None) -> np.ndarray:
    """[F] weights of a hybrid's row calibration (`drafters.hybrid_calibration`), fitted on its recorded rounds
    decoded without one: the logistic regression (`fit_logistic`) of "position k accepted | every earlier one
    accepted" over every verified position. confidence [N, G]; lookup_row, lookup_expected, accepted, proposed
    [N] (`RoundRecords`). num_features: fit the first n of `FEATURES` only, the rest weigh 0 (n =
    len(LEGACY_FEATURES): session 44's map). Raises ValueError without rounds of both sources."""
    from dspark_jax.drafters.hybrid_calibration import FEATURES, row_features
    lookup_row = np.asarray(lookup_row, bool)
    if lookup_row.all() or not lookup_row.any():
        raise ValueError(f"a hybrid row calibration needs rounds of both sources, got {int(lookup_row.sum())} lookup "
                         f"rows of {len(lookup_row)}")
    x = np.asarray(row_features(np.asarray(confidence, np.float32), lookup_row,
                                np.asarray(lookup_expected, np.float32)), np.float64)
    k = np.arange(x.shape[1])[None]
    accepted = np.asarray(accepted)
    tested = k < np.minimum(accepted + 1, np.asarray(proposed))[:, None]
    n = len(FEATURES) if num_features is None else num_features
    weights = np.zeros(len(FEATURES))
    weights[:n] = fit_logistic(x[tested][:, :n], (k < accepted[:, None])[tested], l2)
    return weights


def hybrid_rows_mapped(confidence: np.ndarray, lookup_row: np.ndarray, lookup_expected: np.ndarray,
                       weights) -> np.ndarray:
    """[N, G] recorded greedy rounds' confidences [N, G] through a hybrid row calibration's `weights` at every
    position (`drafters.hybrid_calibration.calibrated_rows`; positions past a round's verified drafts are not scored)."""
    from dspark_jax.drafters.hybrid_calibration import calibrated_rows
    n, g = np.shape(confidence)
    return np.asarray(calibrated_rows(np.asarray(confidence, np.float32), np.asarray(lookup_row, bool),
                                      np.asarray(lookup_expected, np.float32), np.full(n, g), np.zeros(n, np.float32),
                                      tuple(weights)))

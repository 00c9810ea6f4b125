"""Offline refit of a drafter's confidence calibration from `dspark calibrate`'s held-out rounds
(`heldout_records.npz`): sequential temperature scaling (STS, what `dspark calibrate` fits: c_k = σ(z_k / T_k))
against a per-position scale and bias (Platt, c_k = σ(a_k z_k + b_k), fitted left to right by the likelihood of
the observed survival), each fitted on one half of the requests and scored on the other (ECE of the survival
Π_{i≤k} c_i, 20 bins), both ways round.

    python benchmarks/calibration_refit.py --records benchmarks/results/eval/calibration_t0_s17/heldout_records.npz
"""
from __future__ import annotations

import argparse

import numpy as np


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def fit_platt(logits: np.ndarray, survived: np.ndarray) -> np.ndarray:
    """[G, 2] (a_k, b_k) maximising, position by position, the likelihood of the survival labels [N, G] under
    Π_{i≤k} σ(a_i z_i + b_i) with the earlier positions' fits."""
    from scipy.optimize import minimize
    g = logits.shape[1]
    ab, prefix = np.zeros((g, 2)), np.zeros(len(logits))
    for k in range(g):
        def nll(p, k=k, prefix=prefix):
            log_a = np.minimum(prefix + _log_sigmoid(p[0] * logits[:, k] + p[1]), -1e-12)
            return -np.mean(np.where(survived[:, k], log_a, np.log(-np.expm1(log_a))))
        ab[k] = minimize(nll, [1.0, 0.0], method="Nelder-Mead", options=dict(xatol=1e-5, fatol=1e-9, maxiter=4000)).x
        prefix = prefix + _log_sigmoid(ab[k, 0] * logits[:, k] + ab[k, 1])
    return ab


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", required=True, help="heldout_records.npz written by dspark calibrate --report_dir")
    ap.add_argument("--bins", type=int, default=20)
    ap.add_argument("--output", default="benchmarks/results/calibration_refit.json")
    args = ap.parse_args()

    from dspark_jax.evaluation.calibration import fit_sequential_temperatures
    from dspark_jax.evaluation.reliability import expected_calibration_error
    from dspark_jax.utils.results import write_result

    rec = np.load(args.records)
    z = rec["confidence_logits"].astype(np.float64)
    flags, proposed, request = rec["accept_flags"], rec["proposed"], rec["request"]
    survived = np.cumprod(flags, axis=1).astype(bool)
    g = z.shape[1]
    rows = []
    print(f"{len(z)} rounds, {len(np.unique(request))} requests; ECE (%) of the survival on the held-out half, "
          f"positions 1..{g}")
    for half in (0, 1):
        fit, test = (request % 2) == half, (request % 2) != half
        temps = fit_sequential_temperatures(z[fit], flags[fit], proposed[fit])
        ab = fit_platt(z[fit], survived[fit])
        methods = {"raw head": np.cumsum(_log_sigmoid(z[test]), 1),
                   "STS (temperatures)": np.cumsum(_log_sigmoid(z[test] / temps), 1),
                   "Platt (scale + bias)": np.cumsum(_log_sigmoid(ab[:, 0] * z[test] + ab[:, 1]), 1)}
        for name, log_a in methods.items():
            verified = proposed[test][:, None] > np.arange(g)[None]
            ece = [expected_calibration_error(np.exp(log_a[verified[:, k], k]), survived[test][verified[:, k], k],
                                              args.bins) for k in range(g)]
            rows.append(dict(fit_half=half, method=name, ece=ece, rounds_fit=int(fit.sum()),
                             rounds_scored=int(test.sum())))
            print(f"fit on half {half}  {name:<22} " + " ".join(f"{100 * e:5.1f}" for e in ece))
        rows[-1]["platt"] = ab.tolist()
        rows[-2]["temperatures"] = temps.tolist()
    write_result(args.output, dict(records=args.records, bins=args.bins, rows=rows))


if __name__ == "__main__":
    main()

"""Offline refit of a drafter's confidence calibration from `dspark calibrate`'s held-out rounds
(`heldout_records.npz`): sequential temperature scaling (STS, what `dspark calibrate` fits: c_k = σ(z_k / T_k))
against a per-position temperature and bias (`dspark calibrate --bias`: c_k = σ(z_k / T_k + β_k), fitted left to
right by the likelihood of the observed survival), each fitted on one half of the requests and scored on the other (ECE of the survival
Π_{i≤k} c_i, 20 bins), both ways round; with the ECE a perfectly calibrated head would show on the scored half
(`reliability.ece_noise_floor`: sampling noise at that many rounds).

    python benchmarks/calibration_refit.py --records benchmarks/results/eval/calibration_t0_s17/heldout_records.npz
"""
from __future__ import annotations

import argparse

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", required=True, help="heldout_records.npz written by dspark calibrate --report_dir")
    ap.add_argument("--bins", type=int, default=20)
    ap.add_argument("--output", default="benchmarks/results/calibration_refit.json")
    args = ap.parse_args()

    from dspark_jax.evaluation.calibration import (cross_fitted_ece, fit_sequential_scale_and_bias,
                                                   fit_sequential_temperatures)
    from dspark_jax.utils.results import write_result

    rec = np.load(args.records)
    z = rec["confidence_logits"]
    flags, proposed, request = rec["accept_flags"], rec["proposed"], rec["request"]
    g = z.shape[1]
    rows = []
    print(f"{len(z)} rounds, {len(np.unique(request))} requests; ECE (%) of the survival on the held-out half, "
          f"positions 1..{g}")
    methods = {"raw head": lambda *_: (np.ones(g), None),
               "STS (temperatures)": lambda *a: (fit_sequential_temperatures(*a), None),
               "scale + bias": fit_sequential_scale_and_bias}
    by_method = {name: cross_fitted_ece(z, flags, proposed, request, fit, args.bins) for name, fit in methods.items()}
    for half in (0, 1):
        for name, halves in by_method.items():
            r = halves[half]
            row = dict(fit_half=half, method=name, ece=r["ece"], ece_floor=r["floor"], rounds_fit=r["rounds_fit"],
                       rounds_scored=r["rounds_scored"])
            if name != "raw head":
                row["temperatures"] = r["temperatures"]
            if r["biases"] is not None:
                row["biases"] = r["biases"]
            rows.append(row)
            print(f"fit on half {half}  {name:<22} " + " ".join(f"{100 * e:5.1f}" for e in r["ece"]))
        print(f"fit on half {half}  {'noise floor (last)':<22} " + " ".join(f"{100 * e:5.1f}" for e in r["floor"]))
    write_result(args.output, dict(records=args.records, bins=args.bins, rows=rows))


if __name__ == "__main__":
    main()

"""How well a hybrid's row calibration (`dspark_jax.drafters.hybrid_calibration`) fits rounds it was not fitted on:
reads the rounds `dspark calibrate --hybrid` decoded (its report's hybrid_records.npz: the hybrid with its row
calibration off, each round's source in `lookup_draft` / `lookup_expected`), fits the weights on all of them and on
half the requests at a time, and prints the survival ECE per position of the rows as decoded, mapped in sample,
and mapped cross-fitted (fitted on one half, scored on the other) — by source and over all rows
(BENCHMARKS.md "Session 44").

    dspark calibrate --hybrid --drafter default --in_place --temperature 0 --num_prompts 192 --eval_tails 32 \\
        --max_new_tokens 96 --batch_size 16 --report_dir benchmarks/results/eval/hybrid_calibration_s44
    python benchmarks/hybrid_calibration.py --rounds benchmarks/results/eval/hybrid_calibration_s44/hybrid_records.npz \\
        --output benchmarks/results/hybrid_calibration_s44.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def ece_rows(conf: np.ndarray, r: dict, rows: np.ndarray, positions: int) -> dict:
    from dspark_jax.evaluation.reliability import survival_ece
    ece, floor, pairs = survival_ece(conf[rows], r["accept_flags"][rows], r["proposed"][rows], 20, 1)
    return dict(rounds=int(rows.sum()), ece=[float(e) for e in ece[:positions]], worst=float(max(ece)),
                worst_position=int(np.argmax(ece)) + 1, floor_1=float(floor[0]),
                predicted_1=float(pairs[0][0].mean()), observed_1=float(pairs[0][1].mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", required=True, help="hybrid_records.npz of `dspark calibrate --hybrid`")
    ap.add_argument("--l2", type=float, default=1.0, help="L2 penalty of the logistic fit")
    ap.add_argument("--output", default="benchmarks/results/hybrid_calibration.json")
    args = ap.parse_args()
    if not Path(args.rounds).is_file():
        raise SystemExit(f"--rounds {args.rounds} does not exist")

    from dspark_jax.drafters.hybrid_calibration import FEATURES
    from dspark_jax.evaluation.calibration import fit_hybrid_row_calibration, hybrid_rows_mapped
    from dspark_jax.utils.results import write_result

    with np.load(args.rounds) as f:
        r = {k: f[k] for k in f.files}
    for name in ("lookup_draft", "lookup_expected"):
        if name not in r:
            raise SystemExit(f"{args.rounds} has no {name!r} (records before session 44): decode them again")

    def fit(rows):
        return fit_hybrid_row_calibration(r["confidence"][rows], r["lookup_draft"][rows], r["lookup_expected"][rows],
                                          r["accepted"][rows], r["proposed"][rows], args.l2)

    def mapped(weights, rows):
        return hybrid_rows_mapped(r["confidence"][rows], r["lookup_draft"][rows], r["lookup_expected"][rows], weights)

    everything = np.ones(len(r["request"]), bool)
    weights = fit(everything)
    cross = r["confidence"].astype(np.float32).copy()
    fold = r["request"] % 2 == 0
    for train in (fold, ~fold):
        cross[~train] = mapped(fit(train), ~train)
    variants = {"as decoded": r["confidence"], "mapped, in sample": mapped(weights, everything),
                "mapped, cross-fitted": cross}
    results = {}
    print(f"\n{'confidences':>22} {'rows':>7}  survival ECE % positions 1 / 2 / 3 / 4, worst (floor 1)  predicted / "
          f"observed c_1")
    for variant, conf in variants.items():
        for rows_name, rows in (("lookup", r["lookup_draft"]), ("model", ~r["lookup_draft"]), ("all", everything)):
            e = ece_rows(conf, r, rows, 4)
            results[f"{variant}: {rows_name}"] = e
            print(f"{variant:>22} {rows_name:>7}  {' / '.join(f'{100 * x:.1f}' for x in e['ece'])}, "
                  f"{100 * e['worst']:.1f} at {e['worst_position']} ({100 * e['floor_1']:.1f})  "
                  f"{e['predicted_1']:.3f} / {e['observed_1']:.3f}")
    print("\nweights: " + ", ".join(f"{n} {w:+.3f}" for n, w in zip(FEATURES, weights)))
    write_result(args.output, dict(rounds=args.rounds, weights=[float(w) for w in weights], features=list(FEATURES),
                                   l2=args.l2, results=results))


if __name__ == "__main__":
    main()

"""Where the hybrid's survival ECE comes from at position 1: its model rows per set (predicted vs observed c_1), and
whether a Platt map of the model rows' c_1 (a·logit c + b), fitted out of sample (two folds by request), would take
the all-rows ECE under issue 13's 3 %.

    python benchmarks/hybrid_model_rows.py --records runs/s43/t0_hybrid_48/records.npz \
        --output benchmarks/results/hybrid_model_rows_s43.json

Reads a `dspark eval` records.npz of a hybrid drafter (`--drafters "hybrid=default+ngram"`, T = 0): each round's
source as recorded, or in records older than session 44 told by a rule (a lookup row stores logit c as its
confidence logit; `calibration_transfer.lookup_rows`). Writes JSON.
"""
from __future__ import annotations

import argparse

import numpy as np


def logit(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 1e-6, 1 - 1e-6)
    return np.log(c) - np.log1p(-c)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", required=True)
    ap.add_argument("--index", type=int, default=0, help="the hybrid's index in the eval run")
    ap.add_argument("--output", default="benchmarks/results/hybrid_model_rows.json")
    args = ap.parse_args()
    from calibration_transfer import lookup_rows, recorded_lookup_rows  # benchmarks/, the script's own directory

    from dspark_jax.evaluation.calibration import fit_sequential_scale_and_bias
    from dspark_jax.evaluation.reliability import survival_ece
    from dspark_jax.utils.results import write_result

    rec, p = np.load(args.records), f"{args.index}/"
    sets = sorted({k.split("/")[1] for k in rec.files if k.startswith(p)})
    cat = lambda f: np.concatenate([rec[f"{p}{s}/{f}"] for s in sets])  # noqa: E731
    conf, z, flags, proposed = (cat("confidence").astype(np.float64), cat("confidence_logits"), cat("accept_flags"),
                                cat("proposed"))
    set_of = np.concatenate([np.full(len(rec[f"{p}{s}/request"]), i) for i, s in enumerate(sets)])
    request = cat("request") + 100_000 * set_of
    model = ~lookup_rows(z, conf, recorded_lookup_rows(rec, p, sets))
    out = dict(records=args.records, per_set=[], ece={})
    print(f"{'set':>10} {'model rows':>11} {'predicted c_1':>14} {'observed':>9}")
    for i, s in enumerate(sets):
        r = model & (set_of == i) & (proposed > 0)
        row = dict(set=s, model_rows=int(r.sum()), predicted=float(conf[r, 0].mean()), observed=float(flags[r, 0].mean()))
        out["per_set"].append(row)
        print(f"{s:>10} {row['model_rows']:>11} {row['predicted']:>14.3f} {row['observed']:>9.3f}")
    fold = request % 2 == 0
    corrected = conf.copy()
    for train in (fold, ~fold):
        reach = model & train & (proposed > 0)  # position 1 alone: σ(x / T + β) is a Platt map of x = logit c_1
        (t,), (b,) = fit_sequential_scale_and_bias(logit(conf[reach, :1]), flags[reach, :1], proposed[reach])
        test = model & ~train
        corrected[test, 0] = 1 / (1 + np.exp(-(logit(conf[test, 0]) / t + b)))
        out.setdefault("platt_folds", []).append([1 / float(t), float(b)])
    for variant, c in (("as decoded", conf), ("model rows' c_1 Platt-mapped, cross-fitted", corrected)):
        for name, rows in (("model rows", model), ("all rows", np.ones_like(model))):
            ece, floor, _ = survival_ece(c[rows], flags[rows], proposed[rows], 20, 2)
            out["ece"][f"{variant}: {name}"] = dict(ece=[float(e) for e in ece], floor=[float(f) for f in floor])
            print(f"{variant:>44}, {name:>10}: ECE % {' / '.join(f'{100 * e:.1f}' for e in ece[:4])} …, worst "
                  f"{100 * max(ece):.1f} at {int(np.argmax(ece)) + 1} (floor {' / '.join(f'{100 * f:.1f}' for f in floor)})")
    write_result(args.output, out)


if __name__ == "__main__":
    main()

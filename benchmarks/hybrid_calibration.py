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

--heldout_records a.npz,b.npz,... (records.npz of `dspark eval` runs of the hybrid, drafter index 0, pooled) with
--decoded_with DIR (the drafter directory whose row calibration those runs decoded with): the weights fitted here —
with every feature and with session 44's ten (`LEGACY_FEATURES`) — scored on prompts they were not fitted on. The
rows as decoded are un-mapped first (the map is increasing in c, so it inverts; checked by mapping back) to the rows
the hybrid proposed, then mapped by each fit (BENCHMARKS.md "Session 45").
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
    ap.add_argument("--heldout_records", default="", help="comma list of `dspark eval` records.npz of the hybrid "
                    "(drafter index 0) to score the fits on")
    ap.add_argument("--decoded_with", default=None, help="the drafter directory whose row calibration the "
                    "--heldout_records were decoded with")
    ap.add_argument("--output", default="benchmarks/results/hybrid_calibration.json")
    args = ap.parse_args()
    if not Path(args.rounds).is_file():
        raise SystemExit(f"--rounds {args.rounds} does not exist")
    if bool(args.heldout_records) != bool(args.decoded_with):
        raise SystemExit("--heldout_records and --decoded_with go together")

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
    print(f"\n{'confidences':>30} {'rows':>7}  survival ECE % positions 1 / 2 / 3 / 4, worst (floor 1)  predicted / "
          f"observed c_1")
    results = by_source(variants, r)
    print("\nweights: " + ", ".join(f"{n} {w:+.3f}" for n, w in zip(FEATURES, weights)))
    heldout = {}
    if args.heldout_records:
        from dspark_jax.drafters.checkpoint import hybrid_row_calibration
        from dspark_jax.drafters.hybrid_calibration import LEGACY_FEATURES
        h = pooled_records(args.heldout_records.split(","))
        decoded_with = np.asarray(hybrid_row_calibration(args.decoded_with) or np.zeros(len(FEATURES)))
        raw = unmapped(h, decoded_with)
        if not np.allclose(mapped_rows(h, raw, decoded_with), h["confidence"], atol=1e-4):
            raise SystemExit(f"the records were not decoded with {args.decoded_with}'s row calibration")
        legacy = fit_hybrid_row_calibration(r["confidence"], r["lookup_draft"], r["lookup_expected"], r["accepted"],
                                            r["proposed"], args.l2, num_features=len(LEGACY_FEATURES))
        fits = {"as decoded": h["confidence"], "unmapped (no row calibration)": raw,
                f"fit, {len(LEGACY_FEATURES)} features": mapped_rows(h, raw, legacy),
                f"fit, {len(FEATURES)} features": mapped_rows(h, raw, weights)}
        print(f"\non {args.heldout_records} ({len(h['request'])} rounds, decoded with {args.decoded_with}'s map)")
        heldout = by_source(fits, h)
        heldout["legacy_weights"] = [float(w) for w in legacy]
    write_result(args.output, dict(rounds=args.rounds, weights=[float(w) for w in weights], features=list(FEATURES),
                                   l2=args.l2, results=results, heldout_records=args.heldout_records,
                                   decoded_with=args.decoded_with, heldout=heldout))


def by_source(variants: dict, r: dict) -> dict:
    """`ece_rows` of each variant's confidences [N, G] over r's lookup rows, model rows and all rows, printed."""
    out = {}
    for variant, conf in variants.items():
        for rows_name, rows in (("lookup", r["lookup_draft"]), ("model", ~r["lookup_draft"]),
                                ("all", np.ones(len(r["request"]), bool))):
            e = out[f"{variant}: {rows_name}"] = ece_rows(conf, r, rows, 4)
            print(f"{variant:>30} {rows_name:>7}  {' / '.join(f'{100 * x:.1f}' for x in e['ece'])}, "
                  f"{100 * e['worst']:.1f} at {e['worst_position']} ({100 * e['floor_1']:.1f})  "
                  f"{e['predicted_1']:.3f} / {e['observed_1']:.3f}")
    return out


def pooled_records(paths: list[str]) -> dict:
    """The hybrid's rounds (drafter index 0) of several `dspark eval` records.npz, every set, pooled
    (`calibration_transfer.read_records`)."""
    from calibration_transfer import read_records  # benchmarks/, the script's own directory
    rec = read_records(paths)
    sets = sorted({k.split("/")[1] for k in rec.files if k.startswith("0/")})
    fields = ("request", "proposed", "accepted", "accept_flags", "confidence", "lookup_draft", "lookup_expected")
    out = {name: np.concatenate([rec[f"0/{s}/{name}"] for s in sets]) for name in fields}
    out["lookup_draft"] = out["lookup_draft"].astype(bool)
    return out


def unmapped(h: dict, weights: np.ndarray) -> np.ndarray:
    """[N, G] the rows' confidences before the row calibration `weights` (`drafters.hybrid_calibration`), by
    bisection on c (the map is increasing in c wherever it was fitted; the caller checks by mapping back).
    Positions past a lookup's match (c = 0) stay 0."""
    lo, hi = np.zeros_like(h["confidence"], np.float64), np.ones_like(h["confidence"], np.float64)
    for _ in range(40):
        mid = (lo + hi) / 2
        above = mapped_rows(h, mid.astype(np.float32), weights) > h["confidence"]
        hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
    return np.where(h["confidence"] > 0, (lo + hi) / 2, 0.0).astype(np.float32)


def mapped_rows(h: dict, raw: np.ndarray, weights) -> np.ndarray:
    from dspark_jax.evaluation.calibration import hybrid_rows_mapped
    return hybrid_rows_mapped(raw, h["lookup_draft"], h["lookup_expected"], weights)


if __name__ == "__main__":
    main()

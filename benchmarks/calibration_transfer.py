"""How well do a drafter's calibration sets transfer to other prompts? Re-scores the rounds `dspark eval` recorded
(records.npz: each round's raw confidence logits z_k and accept flags) under the calibration set each given drafter
directory holds for the records' sampling temperature — calibration changes confidences, never proposals, so one
eval run of a model scores every calibration of it. Per set: ECE of the predicted prefix survival Π c_i per
position (20 bins, verified positions only, all sets pooled and per evaluation set), the ECE a perfectly calibrated
head would show at that many rounds (`reliability.ece_noise_floor`), mean predicted vs observed survival.
--cross_fit: also what the calibration family itself can do on these prompts — temperature and bias per position
(`dspark calibrate --bias`) fitted on the rounds of half the requests and scored on the other half, both ways round.
--online_offset λ,...: also a calibration conditioned on the request, replayed (not in the product): each
request's c_k at positions ≤ --online_positions moved by one logit offset δ, learnt from its own earlier rounds
(the conditional accept events of its verified positions ≤ --online_positions) by a Laplace-approximation filter
with prior precision λ: δ += Σ (y − c) / (λ + Σ c(1 − c)) after each round. Reads only earlier rounds, so it
would keep decoding lossless (session 36 built it into the hybrid for its model's c_1 and reverted it: inside the
hybrid it did not beat the count record below, BENCHMARKS.md "Session 36").
--by_source: the confidences as decoded (records' `confidence`), ECE per source of a hybrid's rounds: lookup rows
(the lookup stores logit c as its confidence logit, `NgramDrafter.propose`) and model rows (the head's raw logits).
--count_record s,...: the hybrid's per-request correction of its model's confidences (`drafters.hybrid`,
`model_prior_strength`), replayed on every round of the drafter alone: c_k ← (accepted_k + s·c_k) / (tested_k + s),
the request's per-position counts of its earlier rounds.

    python benchmarks/calibration_transfer.py --records benchmarks/results/eval/s25_t0_tails/records.npz \\
        --index 0 --temperature 0 --drafters "before=dspark_jax/drafters/shipped/gemma3_270m_dspark,after=runs/x"

Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse

import numpy as np


def lookup_rows(logits: np.ndarray, decoded: np.ndarray, recorded: np.ndarray | None = None) -> np.ndarray:
    """[N] bool: a hybrid's rows verified from its lookup draft — as recorded (`RoundRecords.lookup_draft`, records
    written since session 44), else told by a rule: the lookup stores logit c as its confidence logit
    (`NgramDrafter.propose`), so its decoded confidences are σ of the logits; the model's are calibrated away from
    them. logits, decoded [N, G] (records' `confidence_logits`, `confidence`)."""
    if recorded is not None:
        return np.asarray(recorded, bool)
    return np.all(np.abs(1.0 / (1.0 + np.exp(-logits.astype(np.float64))) - decoded) < 1e-4, axis=1)


def recorded_lookup_rows(rec, prefix: str, sets: list[str]) -> np.ndarray | None:
    """The sets' `lookup_draft` rows of a records.npz, None where it predates the field."""
    if not all(f"{prefix}{s}/lookup_draft" in rec.files for s in sets):
        return None
    return np.concatenate([rec[f"{prefix}{s}/lookup_draft"] for s in sets])


class Records(dict):
    """The arrays of one or more records.npz as one mapping, keyed as in one file ("<index>/<set>/<field>"); with
    several files each set is renamed "<i>:<set>" (i: the file's position in the list), so their rounds pool."""

    @property
    def files(self) -> list[str]:
        return list(self)


def read_records(paths: list[str]) -> Records:
    out = Records()
    for i, path in enumerate(paths):
        rec = np.load(path)
        for key in rec.files:
            parts = key.split("/", 2)
            if len(parts) == 3:  # round arrays; other entries (the drafters' names) are not read here
                index, name, field = parts
                out[f"{index}/{name if len(paths) == 1 else f'{i}:{name}'}/{field}"] = rec[key]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", required=True, help="records.npz of `dspark eval`; several, comma-separated: their "
                    "rounds pooled (each file's sets named <i>:<set>)")
    ap.add_argument("--index", type=int, default=0, help="the drafter's index in the eval run (its --drafters order)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the eval run")
    ap.add_argument("--drafters", required=True, help="NAME=DIR,... drafter directories whose calibration sets to "
                    "score (same model weights as the eval's drafter)")
    ap.add_argument("--bins", type=int, default=20)
    ap.add_argument("--cross_fit", action="store_true", help="also fit on half the requests, score the other half")
    ap.add_argument("--online_offset", default="", help="comma list of prior precisions λ of the per-request online "
                    "offset (docstring); empty: not replayed")
    ap.add_argument("--online_positions", type=int, default=1, help="positions the online offset moves")
    ap.add_argument("--by_source", action="store_true", help="ECE of the decoded confidences per source of a "
                    "hybrid's rows (lookup / model)")
    ap.add_argument("--count_record", default="", help="comma list of prior strengths s of the count record replayed "
                    "(the hybrid's correction of its model's confidences)")
    ap.add_argument("--output", default="benchmarks/results/calibration_transfer.json")
    args = ap.parse_args()

    from dspark_jax.drafters.checkpoint import calibration_sets
    from dspark_jax.evaluation.calibration import (cross_fitted_ece, fit_sequential_scale_and_bias,
                                                   survival_confidences)
    from dspark_jax.evaluation.reliability import (ece_noise_floor, expected_calibration_error, survival_ece,
                                                   survival_pairs)
    from dspark_jax.utils.results import write_result

    rec = read_records(args.records.split(","))
    prefix = f"{args.index}/"
    sets = sorted({k.split("/")[1] for k in rec.files if k.startswith(prefix)})
    if not sets:
        raise SystemExit(f"no records of drafter index {args.index} in {args.records}")
    data = {s: {f: rec[f"{prefix}{s}/{f}"] for f in ("confidence_logits", "accept_flags", "proposed", "accepted")}
            for s in sets}
    rows, cals = [], []
    for item in args.drafters.split(","):
        name, _, path = item.partition("=")
        calibrations = calibration_sets(path)
        if not calibrations:
            raise SystemExit(f"{path}: not calibrated")
        cal = min(calibrations, key=lambda c: abs(c.sampling_temperature - args.temperature))
        per_set = {}
        for scope in sets + ["all"]:
            chosen = sets if scope == "all" else [scope]
            z = np.concatenate([data[s]["confidence_logits"] for s in chosen])
            flags = np.concatenate([data[s]["accept_flags"] for s in chosen])
            proposed = np.concatenate([data[s]["proposed"] for s in chosen])
            conf = survival_confidences(z, cal.temperatures, cal.biases)
            per_set[scope] = [dict(position=k + 1, rounds=int(len(p)), ece=expected_calibration_error(p, y, args.bins),
                                   floor=ece_noise_floor(p, args.bins), predicted=float(p.mean()),
                                   observed=float(y.mean()))
                              for k, (p, y) in enumerate(survival_pairs(conf, flags, proposed))]
        cals.append(cal)
        rows.append(dict(name=name, path=path, calibrated_at=cal.sampling_temperature,
                         prompts=cal.record.get("prompts"), results=per_set))
        print(f"\n{name} ({path}; set fitted at T = {cal.sampling_temperature:g} on {cal.record.get('prompts')})")
        print(f"{'scope':>10} {'position':>8} {'rounds':>7} {'ECE %':>6} {'floor %':>8} {'predicted':>10} "
              f"{'observed':>9}")
        for scope, table in per_set.items():
            for r in table:
                if scope == "all" or r["position"] == 1:
                    print(f"{scope:>10} {r['position']:>8} {r['rounds']:>7} {100 * r['ece']:>6.1f} "
                          f"{100 * r['floor']:>8.1f} {r['predicted']:>10.3f} {r['observed']:>9.3f}")
    cross = []
    if args.cross_fit:
        z = np.concatenate([data[s]["confidence_logits"] for s in sets])
        flags = np.concatenate([data[s]["accept_flags"] for s in sets])
        proposed = np.concatenate([data[s]["proposed"] for s in sets])
        request = np.concatenate([rec[f"{prefix}{s}/request"] + 100_000 * i for i, s in enumerate(sets)])
        print("\ncross-fitted temperature + bias per position (fit on half the requests, ECE % on the other half)")
        for row in cross_fitted_ece(z, flags, proposed, request, fit_sequential_scale_and_bias, args.bins):
            cross.append(dict(fitted_on_half=row["fitted_on_half"], ece=row["ece"], floor=row["floor"],
                              rounds=row["rounds_scored"]))
            print(f"  fitted on half {row['fitted_on_half']}: ECE {' / '.join(f'{100 * e:.1f}' for e in row['ece'])}; "
                  f"floor {' / '.join(f'{100 * f:.1f}' for f in row['floor'])} ({row['rounds_scored']} rounds scored)")
    flags_all = np.concatenate([data[s]["accept_flags"] for s in sets])
    proposed_all = np.concatenate([data[s]["proposed"] for s in sets])

    def scores(conf: np.ndarray, rows_of=slice(None), floor_positions: int | None = None):
        """`reliability.survival_ece` of conf [N, G] against all sets' rounds (`rows_of` of them)."""
        return survival_ece(conf, flags_all[rows_of], proposed_all[rows_of], args.bins, floor_positions)

    lams = [float(x) for x in args.online_offset.split(",") if x]
    strengths = [float(x) for x in args.count_record.split(",") if x]
    bases = [{s: survival_confidences(data[s]["confidence_logits"], cal.temperatures, cal.biases) for s in sets}
             for cal in (cals if lams or strengths else [])]  # each drafter's calibrated confidences, per set
    online = []
    for lam in lams:
        for row, base in zip(rows, bases):
            ece, floor, _ = scores(np.concatenate([
                online_offset(base[s], data[s]["accepted"], data[s]["proposed"], rec[f"{prefix}{s}/request"], lam,
                              args.online_positions) for s in sets]))
            online.append(dict(name=row["name"], prior_precision=lam, positions=args.online_positions, ece=ece,
                               floor=floor))
            print(f"\n{row['name']} with a per-request online offset at positions <= {args.online_positions}, λ {lam:g}: "
                  f"ECE % {' / '.join(f'{100 * e:.1f}' for e in ece[:8])} …; worst {100 * max(ece):.1f} "
                  f"(floor {' / '.join(f'{100 * f:.1f}' for f in floor[:8])} …)")
    counted = []
    for strength in strengths:
        for row, base in zip(rows, bases):
            ece, _, _ = scores(np.concatenate([
                count_record(base[s], data[s]["accepted"], data[s]["proposed"], rec[f"{prefix}{s}/request"], strength)
                for s in sets]), floor_positions=0)
            counted.append(dict(name=row["name"], strength=strength, ece=ece))
            print(f"\n{row['name']} with the count record, s {strength:g}: ECE % "
                  f"{' / '.join(f'{100 * e:.1f}' for e in ece[:8])} …; worst {100 * max(ece):.1f}")
    by_source = []
    if args.by_source:
        decoded = np.concatenate([rec[f"{prefix}{s}/confidence"] for s in sets])
        z = np.concatenate([data[s]["confidence_logits"] for s in sets])
        lookup = lookup_rows(z, decoded, recorded_lookup_rows(rec, prefix, sets))
        print("\nconfidences as decoded, per source (20-bin ECE % of the survival, positions 1..; floor in brackets)")
        for source, rows_of in (("lookup", lookup), ("model", ~lookup), ("all", np.ones_like(lookup))):
            ece, floor, pairs = scores(decoded[rows_of], rows_of)
            by_source.append(dict(source=source, rounds=int(rows_of.sum()), ece=ece, floor=floor,
                                  predicted=[float(p.mean()) for p, _ in pairs],
                                  observed=[float(y.mean()) for _, y in pairs]))
            print(f"{source:>7} ({int(rows_of.sum())} rounds): {' / '.join(f'{100 * e:.1f}' for e in ece[:4])} …, worst "
                  f"{100 * max(ece):.1f} (floor {' / '.join(f'{100 * f:.1f}' for f in floor[:4])} …); position 1 "
                  f"predicted {by_source[-1]['predicted'][0]:.3f}, observed {by_source[-1]['observed'][0]:.3f}")
    write_result(args.output, dict(records=args.records, index=args.index, temperature=args.temperature,
                                   bins=args.bins, drafters=rows, cross_fit=cross, online_offset=online,
                                   count_record=counted, by_source=by_source))


def online_offset(conf: np.ndarray, accepted: np.ndarray, proposed: np.ndarray, request: np.ndarray, lam: float,
                  positions: int) -> np.ndarray:
    """conf [N, G] (rounds of each request in order) with positions < `positions` moved per request by the offset
    δ its earlier rounds taught (module docstring); accepted, proposed, request [N]."""
    out = np.array(conf, np.float64)
    k = np.arange(conf.shape[1])
    moved = k < positions
    for r in np.unique(request):
        delta, precision = 0.0, lam
        for i in np.flatnonzero(request == r):
            p = np.clip(out[i], 1e-6, 1 - 1e-6)
            out[i] = np.where(moved, 1.0 / (1.0 + np.exp(-(np.log(p / (1 - p)) + delta))), out[i])
            seen = moved & (k < min(accepted[i] + 1, proposed[i]))  # the conditional accept events observed
            y = (k < accepted[i]).astype(np.float64)
            precision += float(np.sum((out[i] * (1 - out[i]))[seen]))
            delta += float(np.sum((y - out[i])[seen])) / precision
    return out


def count_record(conf: np.ndarray, accepted: np.ndarray, proposed: np.ndarray, request: np.ndarray,
                 strength: float) -> np.ndarray:
    """conf [N, G] (rounds of each request in order) corrected per request by its earlier rounds' counts:
    (accepted_k + s·c_k) / (tested_k + s), position k tested where every earlier draft was accepted (module
    docstring); accepted, proposed, request [N]."""
    out = np.array(conf, np.float64)
    k = np.arange(conf.shape[1])
    for r in np.unique(request):
        tested, ok = np.zeros(conf.shape[1]), np.zeros(conf.shape[1])
        for i in np.flatnonzero(request == r):
            out[i] = (ok + strength * out[i]) / (tested + strength)
            tested += k < min(accepted[i] + 1, proposed[i])
            ok += k < min(accepted[i], proposed[i])
    return out


if __name__ == "__main__":
    main()

"""How well calibrated is prompt lookup's online acceptance estimate, and what would a different prior do? Replays
lookup alone (n_max 3, γ 15, T = 0) over (prompt, greedy output) pairs, exactly as the offline simulation does
(`evaluation.lookup_simulation`), and scores each round's estimate as `NgramDrafter` forms it — per request and
match length n, c_k = (accepted_k + s·m_k) / (tested_k + s) from the request's earlier rounds and a prior m worth s
observations (`drafters.ngram.lookup_confidence`) — by the ECE of the predicted survival Π c_i per position (20
bins, verified positions only; `evaluation.reliability`). No model, no timing: seconds.

Priors m, all from training responses (never the evaluated pairs): 'all' — the shipped one, every round of the
first 783 greedy training responses (`benchmarks/ngram_prior.py`); 'first' — each training response's first round
per match length (`--rounds first`, what a request without a record of its own meets); 'switch' — 'first' while the
request has no test of that match length yet, then 'all' with strength s; 'state' — the prior and the request's
record kept apart by whether the request's previous lookup round had its first draft accepted (both from every
round of the first 783 training responses): a request inside a loop and one outside it in separate counts.

    python benchmarks/lookup_calibration.py [--pairs training --strengths 1,4,16 --output ...]

--pairs training: the greedy training responses past the first 783 (out of sample for both priors' 'all'; the
'first' prior counts every response's first round, so it is in sample there); --pairs eval: the target's greedy
96-token outputs for the first --limit prompts of each evaluation set (decoded here, ~6 min on a 2-core CPU;
--pairs_cache keeps them). The row 'calibrated' is the drafter's default: the 'all' prior at s 4 through the fitted
logistic calibration (`drafters.ngram.calibrated_confidence`, `ngram_calibration.json`); `ngram:calibrated=0` keeps
the count estimate alone (the row 'all' at s 4). Writes JSON.

--fit fits that calibration and writes `dspark_jax/drafters/ngram_calibration.json` (the T = 0 set): logistic
regression (Newton, L2 1) of "position k accepted | earlier ones accepted" on the features of
`drafters.ngram.calibration_features`, over the lookup rounds (`evaluation.lookup_simulation.lookup_records`) of
the target's greedy 96-token outputs for the calibration prompts `dspark calibrate --eval_tails 32` uses (96 of the
held-out mix + the last 32 of humaneval, mbpp and mt-bench; never the first 48 of an evaluation set), ~8 min:

    python benchmarks/lookup_calibration.py --fit --pairs_cache runs/lookup_calibration_pairs.json

--candidate fits the same regression twice on those rounds — the drafter's features, and without the match's source
(`history_features`: no feature of whether the matched text lies in the output or the prompt, the loop's period, or
whether a draft position extrapolates past it; sessions 37–38's calibration) — and scores both on the evaluation
outputs (seconds with both pair caches):

    python benchmarks/lookup_calibration.py --candidate --calibration_pairs_cache runs/lookup_calibration_pairs.json \
        --pairs_cache runs/lookup_eval_pairs.json
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESPONSES = ROOT / "dspark_jax" / "data" / "train" / "gemma3_270m_greedy_responses.jsonl.gz"
N_MAX, GAMMA, SHIPPED_PRIOR_RESPONSES, SHIPPED_STRENGTH = 3, 15, 783, 4.0
PRIOR_GAMMA = 16  # the draft length `ngram_prior.py` simulates (its default): it changes which rounds are counted


def prior_table(pairs, first_only: bool) -> np.ndarray:
    """[N_MAX, GAMMA] Laplace-smoothed conditional acceptance means over `pairs`, simulated as `ngram_prior.py` does
    (γ 16, its first GAMMA slots, 4 decimals: with `pairs` the first 783 training responses and first_only False,
    exactly the shipped file's table)."""
    from dspark_jax.evaluation.lookup_simulation import conditional_acceptance
    tested, accepted = conditional_acceptance(pairs, N_MAX, 1, PRIOR_GAMMA, first_only=first_only)
    means = (np.asarray(accepted, np.float64) + 1) / (np.asarray(tested, np.float64) + 2)
    return np.round(means, 4)[:, :GAMMA]  # rounded as the file stores them


def state_prior(pairs) -> np.ndarray:
    """[2, N_MAX, GAMMA] the 'state' prior: Laplace-smoothed means over every round of `pairs`, apart by whether the
    previous lookup round's first draft was accepted (index 1) or not / no previous round (0)."""
    tested, ok = np.zeros((2, N_MAX, GAMMA)), np.zeros((2, N_MAX, GAMMA))
    for state, n, a, room in rounds(pairs):
        if state is None:  # the end of a pair
            continue
        k = np.arange(GAMMA)
        tested[state, n - 1] += k < min(a + 1, room)
        ok[state, n - 1] += k < min(a, room)
    return (ok + 1) / (tested + 2)


def rounds(pairs):
    """Every lookup round of `pairs` with a draft, in order, per pair (`lookup_simulation.lookup_records`): (state,
    n, accepted drafts a, drafts room); state: 1 where the pair's previous lookup round with a draft had its first
    draft accepted. Each pair ends with (None, 0, 0, 0): its record ends with it."""
    from dspark_jax.evaluation.lookup_simulation import lookup_records
    no_prior = np.zeros((N_MAX, GAMMA))  # the records' count estimates are not read here
    for prompt, output in pairs:
        for r in lookup_records(prompt, output, no_prior, 1.0, N_MAX, 1, GAMMA):
            yield int(r.previous >= 1), r.n, r.accepted, r.room
        yield None, 0, 0, 0


def replay(pairs, priors: dict, kind: str, strength: float):
    """Every lookup round of `pairs` with a draft: (confidence [R, GAMMA], accept flags [R, GAMMA], drafts [R])."""
    conf, flags, drafted = [], [], []
    k = np.arange(GAMMA)
    tested, ok = np.zeros((2, N_MAX, GAMMA)), np.zeros((2, N_MAX, GAMMA))
    for state, n, a, room in rounds(pairs):
        if state is None:  # a new request: a fresh record
            tested, ok = np.zeros_like(tested), np.zeros_like(ok)
            continue
        key = (state if kind == "state" else 0, n - 1)
        if kind == "switch" and tested[key][0] == 0:
            c = priors["first"][n - 1]
        else:
            m = priors["state"][key] if kind == "state" else priors["first" if kind == "first" else "all"][n - 1]
            c = (ok[key] + strength * m) / (tested[key] + strength)
        conf.append(c)
        flags.append(k < a)
        drafted.append(room)
        tested[key] += k < min(a + 1, room)
        ok[key] += k < min(a, room)
    return np.asarray(conf), np.asarray(flags), np.asarray(drafted)


def greedy_pairs(target, named_prompts: list[tuple[str, list[str]]]) -> list:
    """(prompt ids, greedy 96-token output ids) for each group of formatted prompts, decoded at batch 8."""
    from dspark_jax.generation import GenerationConfig, encode_prompts, generate_text
    pairs = []
    for name, prompts in named_prompts:
        print(f"[{name}] decoding {len(prompts)} prompts ...", flush=True)
        results = generate_text(target, prompts, GenerationConfig(max_new_tokens=96, batch_size=8))
        pairs += [(list(map(int, ids)), list(map(int, r.completion_ids)))
                  for ids, r in zip(encode_prompts(target, prompts, 96), results)]
    return pairs


def eval_pairs(limit: int) -> list:
    """(prompt ids, greedy 96-token output ids) for the first `limit` prompts of each evaluation set."""
    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    return greedy_pairs(load_target(), [(name, [format_prompt(p) for p in read_first_turns(eval_dataset_path(name))[:limit]])
                                        for name in ("gsm8k", "humaneval", "mbpp", "mt-bench")])


def calibration_pairs() -> list:
    """(prompt ids, greedy 96-token output ids) for `dspark calibrate --eval_tails 32`'s 192 prompts (prompts over
    256 tokens skipped, as there)."""
    from dspark_jax.evaluation.datasets import TAIL_SETS, eval_tail_prompts, heldout_prompts
    from dspark_jax.target import load_target
    target = load_target()
    fits = lambda p: len(target.tokenizer.encode(p)) <= 256  # noqa: E731
    return greedy_pairs(target, [("held-out mix", heldout_prompts(96, 0, keep=fits)),
                                 ("evaluation tails", eval_tail_prompts(32, TAIL_SETS, keep=fits))])


def cached(path: str | None, make) -> list:
    """`make()`'s pairs, read from / written to the JSON file `path` when given."""
    if path and Path(path).exists():
        return [tuple(pair) for pair in json.loads(Path(path).read_text())]
    pairs = make()
    if path:
        from dspark_jax.utils.files import atomic_write_text
        atomic_write_text(Path(path), json.dumps(pairs))
    return pairs


def record_arrays(pairs, prior: np.ndarray, strength: float) -> dict:
    """The lookup rounds with a draft of `pairs` (`lookup_simulation.lookup_records`, γ 15) as arrays: n,
    count_confidence [R, γ], previous, streak, accepted, room."""
    from dspark_jax.evaluation.lookup_simulation import lookup_records
    records = [r for prompt, output in pairs for r in lookup_records(prompt, output, prior, strength, N_MAX, 1, GAMMA)]
    return {field: np.asarray([getattr(r, field) for r in records]) for field in records[0]._fields}


def calibrated(records: dict, weights) -> np.ndarray:
    """[R, γ] the drafter's calibrated confidences of `records` (`drafters.ngram.calibrated_confidence`)."""
    from dspark_jax.drafters.ngram import calibrated_confidence
    w = np.broadcast_to(np.asarray(weights, np.float32), (len(records["n"]), len(weights)))
    return np.asarray(calibrated_confidence(records["count_confidence"], records["n"], records["previous"],
                                            records["streak"], records["period"], records["in_output"], w), np.float64)


def shipped_features(records: dict) -> np.ndarray:
    """[R, γ, F] the drafter's calibration features of `records` (`drafters.ngram.calibration_features`)."""
    from dspark_jax.drafters.ngram import calibration_features
    return np.asarray(calibration_features(records["count_confidence"], records["n"], records["previous"],
                                           records["streak"], records["period"], records["in_output"]), np.float64)


def history_features(records: dict) -> np.ndarray:
    """[R, γ, F − 5] the drafter's features without the match's source (`drafters.ngram.SOURCE_FEATURES`, its last
    five: whether the match lies in the output, its period, and whether a draft position continues the loop past
    it) — the calibration of sessions 37–38."""
    from dspark_jax.drafters.ngram import SOURCE_FEATURES
    return shipped_features(records)[..., :-len(SOURCE_FEATURES)]


def fit_calibration(records: dict, l2: float = 1.0, iterations: int = 50, features=shipped_features) -> np.ndarray:
    """[F] logistic weights of "position k accepted | every earlier one accepted" on `features(records)` (the
    drafter's calibration features by default), over every verified position of `records` (Newton's method with an
    L2 penalty `l2`)."""
    from dspark_jax.evaluation.calibration import fit_logistic
    x = features(records)
    k = np.arange(GAMMA)[None]
    verified = k < np.minimum(records["accepted"] + 1, records["room"])[:, None]
    return fit_logistic(x[verified], (k < records["accepted"][:, None])[verified], l2, iterations)


def scores(conf: np.ndarray, records: dict) -> tuple[list, list, float, float, list, float]:
    """(ECE per position, noise floor at positions 1–2, predicted / observed c_1, AUC at positions 1–4, expected
    accepted drafts per round Σ_k Π_{i≤k} c_i over the room) of the survival Π c_i (`reliability.survival_ece`);
    records["accepted"].mean() is the realised count. ECE says whether the estimate is right on average, AUC whether
    it ranks rounds (what a choice between rounds, buckets and sources reads)."""
    from dspark_jax.evaluation.reliability import roc_auc, survival_ece
    ece, floor, sp = survival_ece(conf, np.arange(GAMMA)[None] < records["accepted"][:, None], records["room"],
                                  floor_positions=2)
    expected = (np.cumprod(conf, axis=1) * (np.arange(GAMMA)[None] < records["room"][:, None])).sum(1).mean()
    return (ece, floor, float(sp[0][0].mean()), float(sp[0][1].mean()), [roc_auc(p, y) for p, y in sp[:4]],
            float(expected))


def candidate_main(args, prior_all: np.ndarray) -> None:
    """--candidate: the drafter's features and `history_features`, each fitted on the calibration prompts' outputs
    and scored there (in sample) and on the evaluation outputs; prints a table and writes JSON."""
    from dspark_jax.utils.results import write_result
    calibration = record_arrays(cached(args.calibration_pairs_cache, calibration_pairs), prior_all, SHIPPED_STRENGTH)
    evaluation = record_arrays(cached(args.pairs_cache, lambda: eval_pairs(args.limit)), prior_all, SHIPPED_STRENGTH)
    rows = []
    print(f"{'features':>8} {'scored on':>12} {'rounds':>7}  ECE % positions 1 / 2 / 3 / 4, worst of {GAMMA} "
          f"(floor 1 / 2)  AUC 1 / 2 / 3 / 4  expected / realised accepted")
    for name, features in (("history", history_features), ("shipped", shipped_features)):
        weights = fit_calibration(calibration, features=features)
        for scored, records in (("calibration", calibration), ("evaluation", evaluation)):
            conf = 1 / (1 + np.exp(-(features(records) @ weights)))
            ece, floor, pred, obs, auc, expected = scores(conf, records)
            worst = int(np.nanargmax(ece))
            rows.append(dict(features=name, scored_on=scored, rounds=int(len(records["n"])), ece=ece, floor=floor,
                             auc=auc, predicted_1=pred, observed_1=obs, expected_accepted=expected,
                             realised_accepted=float(records["accepted"].mean()), weights=weights.tolist()))
            print(f"{name:>8} {scored:>12} {len(records['n']):>7}  {' / '.join(f'{100 * e:.1f}' for e in ece[:4])}, "
                  f"worst {100 * ece[worst]:.1f} at {worst + 1} ({' / '.join(f'{100 * f:.1f}' for f in floor)})  "
                  f"{' / '.join(f'{a:.3f}' for a in auc)}  {expected:.2f} / {records['accepted'].mean():.2f}",
                  flush=True)
    from dspark_jax.drafters.ngram import SOURCE_FEATURES
    write_result(args.output, dict(mode="candidate", limit=args.limit, n_max=N_MAX, gamma=GAMMA,
                                   source_features=list(SOURCE_FEATURES), rows=rows))


def fit_main(args, prior_all: np.ndarray) -> None:
    """--fit: fit the calibration on the calibration prompts' outputs and write it into the package."""
    import sys

    from dspark_jax.drafters.ngram import CALIBRATION_FEATURES, CALIBRATION_FILE
    from dspark_jax.utils.files import atomic_write_text
    records = record_arrays(cached(args.pairs_cache, calibration_pairs), prior_all, SHIPPED_STRENGTH)
    weights = fit_calibration(records)
    before = scores(records["count_confidence"], records)
    after = scores(calibrated(records, weights), records)
    for name, (ece, floor, pred, obs, _, _) in (("count estimate", before), ("calibrated (in sample)", after)):
        print(f"{name:>24}: ECE % {' / '.join(f'{100 * e:.1f}' for e in ece[:4])}, worst {100 * np.nanmax(ece):.1f} "
              f"(floor {' / '.join(f'{100 * f:.1f}' for f in floor)}); predicted / observed c_1 {pred:.3f} / {obs:.3f}")
    print("weights:", ", ".join(f"{name} {w:+.3f}" for name, w in zip(CALIBRATION_FEATURES, weights)))
    entry = dict(temperature=0.0, n_max=N_MAX, prior_strength=SHIPPED_STRENGTH, gamma=GAMMA,
                 features=list(CALIBRATION_FEATURES), weights=[round(float(w), 6) for w in weights],
                 rounds=int(len(records["n"])), fitted_on="greedy 96-token outputs of dspark calibrate --eval_tails 32's "
                 "192 prompts", in_sample_ece=[round(e, 4) for e in after[0]],
                 command=" ".join(["python benchmarks/lookup_calibration.py", *sys.argv[1:]]))
    atomic_write_text(CALIBRATION_FILE, json.dumps(dict(sets=[entry]), indent=1) + "\n")
    print(f"wrote {CALIBRATION_FILE}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", choices=("training", "eval"), default="training")
    ap.add_argument("--limit", type=int, default=32, help="--pairs eval: prompts per evaluation set")
    ap.add_argument("--strengths", default="1,4,16", help="prior strengths s, comma-separated (4: the shipped one)")
    ap.add_argument("--fit", action="store_true", help="fit the shipped calibration and write it (module doc)")
    ap.add_argument("--pairs_cache", default=None, help="JSON file keeping the decoded pairs (--pairs eval, --fit; "
                    "with --candidate the evaluation pairs)")
    ap.add_argument("--candidate", action="store_true", help="fit the drafter's features and the same without the "
                    "match's source (`history_features`) on the calibration prompts, score both on the evaluation "
                    "outputs (module doc)")
    ap.add_argument("--calibration_pairs_cache", default=None, help="--candidate: JSON file keeping the calibration "
                    "prompts' pairs (--fit's --pairs_cache)")
    ap.add_argument("--output", default="benchmarks/results/lookup_calibration.json")
    args = ap.parse_args()

    from dspark_jax.drafters.ngram import calibration_weights
    from dspark_jax.utils.results import write_result

    with gzip.open(RESPONSES, "rt") as f:
        rows = [json.loads(line) for line in f]
    training = [(r["prompt_ids"], r["response_ids"]) for r in rows]
    prior_all = prior_table(training[:SHIPPED_PRIOR_RESPONSES], first_only=False)
    if args.fit:
        return fit_main(args, prior_all)
    if args.candidate:
        return candidate_main(args, prior_all)
    prior_first = prior_table(training, first_only=True)
    priors = dict(all=prior_all, first=prior_first, state=state_prior(training[:SHIPPED_PRIOR_RESPONSES]))
    print(f"position-1 prior, n = 1 / 2 / 3: all rounds {' / '.join(f'{m:.3f}' for m in prior_all[:, 0])}; "
          f"first rounds {' / '.join(f'{m:.3f}' for m in prior_first[:, 0])}")
    pairs = (training[SHIPPED_PRIOR_RESPONSES:] if args.pairs == "training"
             else cached(args.pairs_cache, lambda: eval_pairs(args.limit)))
    results = []
    print(f"{'prior':>10} {'s':>5} {'rounds':>7}  ECE % positions 1 / 2 / 3 / 4, worst of {GAMMA} (floor 1 / 2)  "
          f"predicted / observed at 1  AUC 1 / 2 / 3 / 4  expected / realised accepted")

    def row(kind, strength, ece, floor, pred, obs, auc, expected, rounds, realised):
        results.append(dict(prior=kind, strength=strength, rounds=rounds, ece=ece, floor=floor, predicted_1=pred,
                            observed_1=obs, auc=auc, expected_accepted=expected, realised_accepted=realised))
        print(f"{kind:>10} {strength:>5g} {rounds:>7}  {' / '.join(f'{100 * e:.1f}' for e in ece[:4])}, "
              f"worst {100 * np.nanmax(ece):.1f} ({' / '.join(f'{100 * f:.1f}' for f in floor)})  "
              f"{pred:.3f} / {obs:.3f}  {' / '.join(f'{a:.3f}' for a in auc)}  {expected:.2f} / {realised:.2f}",
              flush=True)

    for kind in ("all", "first", "switch", "state"):
        for strength in [float(s) for s in args.strengths.split(",")]:
            conf, flags, drafted = replay(pairs, priors, kind, strength)
            records = dict(accepted=flags.sum(1), room=drafted)
            row(kind, strength, *scores(conf, records), len(conf), float(records["accepted"].mean()))
    weights = calibration_weights(N_MAX, SHIPPED_STRENGTH)
    if weights is not None:  # the shipped calibration (its T = 0 set)
        records = record_arrays(pairs, prior_all, SHIPPED_STRENGTH)
        row("calibrated", SHIPPED_STRENGTH, *scores(calibrated(records, weights[0]), records), len(records["n"]),
            float(records["accepted"].mean()))
    write_result(args.output, dict(pairs=args.pairs, limit=args.limit, n_max=N_MAX, gamma=GAMMA,
                                   prior_all_position_1=prior_all[:, 0].tolist(),
                                   prior_first_position_1=prior_first[:, 0].tolist(), rows=results))


if __name__ == "__main__":
    main()

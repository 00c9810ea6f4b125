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
96-token outputs for the first --limit prompts of each evaluation set (decoded here, ~4 min on a 2-core CPU).
Writes JSON.
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESPONSES = ROOT / "dspark_jax" / "data" / "train" / "gemma3_270m_greedy_responses.jsonl.gz"
N_MAX, GAMMA, SHIPPED_PRIOR_RESPONSES = 3, 15, 783
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
    """Every lookup round of `pairs` with a draft, in order, per pair (`lookup_simulation.lookup_rounds`): (state,
    n, accepted drafts a, drafts room); state: 1 where the pair's previous lookup round with a draft had its first
    draft accepted. Each pair ends with (None, 0, 0, 0): its record ends with it."""
    from dspark_jax.evaluation.lookup_simulation import lookup_rounds
    for prompt, output in pairs:
        state = 0
        for n, a, room, _ in lookup_rounds(prompt, output, N_MAX, 1, GAMMA):
            if room > 0:
                yield state, n, a, room
                state = int(a >= 1)
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


def eval_pairs(limit: int) -> list:
    """(prompt ids, greedy 96-token output ids) for the first `limit` prompts of each evaluation set."""
    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.generation import GenerationConfig, encode_prompts, generate_text
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    target = load_target()
    pairs = []
    for name in ("gsm8k", "humaneval", "mbpp", "mt-bench"):
        prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path(name))[:limit]]
        print(f"[{name}] decoding {len(prompts)} prompts ...", flush=True)
        results = generate_text(target, prompts, GenerationConfig(max_new_tokens=96, batch_size=8))
        pairs += [(ids, r.completion_ids) for ids, r in zip(encode_prompts(target, prompts, 96), results)]
    return pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", choices=("training", "eval"), default="training")
    ap.add_argument("--limit", type=int, default=32, help="--pairs eval: prompts per evaluation set")
    ap.add_argument("--strengths", default="1,4,16", help="prior strengths s, comma-separated (4: the shipped one)")
    ap.add_argument("--output", default="benchmarks/results/lookup_calibration.json")
    args = ap.parse_args()

    from dspark_jax.evaluation.reliability import ece_noise_floor, expected_calibration_error, survival_pairs
    from dspark_jax.utils.results import write_result

    with gzip.open(RESPONSES, "rt") as f:
        rows = [json.loads(line) for line in f]
    training = [(r["prompt_ids"], r["response_ids"]) for r in rows]
    prior_all = prior_table(training[:SHIPPED_PRIOR_RESPONSES], first_only=False)
    prior_first = prior_table(training, first_only=True)
    priors = dict(all=prior_all, first=prior_first, state=state_prior(training[:SHIPPED_PRIOR_RESPONSES]))
    print(f"position-1 prior, n = 1 / 2 / 3: all rounds {' / '.join(f'{m:.3f}' for m in prior_all[:, 0])}; "
          f"first rounds {' / '.join(f'{m:.3f}' for m in prior_first[:, 0])}")
    pairs = training[SHIPPED_PRIOR_RESPONSES:] if args.pairs == "training" else eval_pairs(args.limit)
    results = []
    print(f"{'prior':>7} {'s':>5} {'rounds':>7}  ECE % positions 1 / 2 / 3 / 4, worst of {GAMMA} (floor 1 / 2)  "
          f"predicted / observed at 1")
    for kind in ("all", "first", "switch", "state"):
        for strength in [float(s) for s in args.strengths.split(",")]:
            conf, flags, drafted = replay(pairs, priors, kind, strength)
            sp = survival_pairs(conf, flags, drafted)
            ece = [expected_calibration_error(p, y) for p, y in sp]
            floor = [ece_noise_floor(p) for p, _ in sp[:2]]
            worst = np.nanmax(ece)
            results.append(dict(prior=kind, strength=strength, rounds=len(conf), ece=ece, floor=floor,
                                predicted_1=float(sp[0][0].mean()), observed_1=float(sp[0][1].mean())))
            print(f"{kind:>7} {strength:>5g} {len(conf):>7}  {' / '.join(f'{100 * e:.1f}' for e in ece[:4])}, "
                  f"worst {100 * worst:.1f} ({' / '.join(f'{100 * f:.1f}' for f in floor)})  "
                  f"{results[-1]['predicted_1']:.3f} / {results[-1]['observed_1']:.3f}", flush=True)
    write_result(args.output, dict(pairs=args.pairs, limit=args.limit, n_max=N_MAX, gamma=GAMMA,
                                   prior_all_position_1=prior_all[:, 0].tolist(),
                                   prior_first_position_1=prior_first[:, 0].tolist(), rows=results))


if __name__ == "__main__":
    main()

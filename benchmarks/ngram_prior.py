"""Writes the prior of prompt lookup's acceptance estimates: per match length n and draft position k, the
conditional acceptance c_k = P(position k accepted | earlier ones accepted) of lookup over training responses
of the embedded target (`dspark_jax/data/train`; never the held-out prompts), from the offline simulation
(`evaluation.lookup_simulation.conditional_acceptance`). `NgramDrafter` starts every request from these means
(Laplace-smoothed) and moves to its own online counts. --rounds first counts each response's first round with an
n-token match alone: the rounds where a request has no record of its own and reads the prior alone. On the
training responses a 1-token match is accepted 0.48 of the time over all rounds — mostly inside loops — but a
response's first 1-token match only 0.09 (0.07 on the evaluation prompts). Shipping those first-round means as the
prior (worth 4 observations in every later round too) made the hybrid's lookup confidences worse, not better
(BENCHMARKS.md "Session 36"): the shipped prior counts all rounds.

One set per sampling temperature: on responses drawn at temperature T the simulation's "the draft equals the
next token" has the expectation E[p_t(x)], lookup's acceptance probability at T. A run writes the set of
--temperature into the file and keeps the sets of other temperatures; each request uses the nearest.

    # the shipped prior: the first 783 greedy responses (T = 0) and 256 responses at T = 1 (no top-k / top-p)
    python benchmarks/ngram_prior.py --max_responses 783                          # ~30 s
    python benchmarks/ngram_prior.py --temperature 1 \
        --responses dspark_jax/data/train/gemma3_270m_t1_responses_seed1.jsonl.gz  # ~10 s
    # each response's first round per match length, all 2,924 greedy responses, to another file
    python benchmarks/ngram_prior.py --rounds first --output runs/ngram_prior_first.json
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESPONSES = ROOT / "dspark_jax" / "data" / "train" / "gemma3_270m_greedy_responses.jsonl.gz"
OUTPUT = ROOT / "dspark_jax" / "drafters" / "ngram_prior.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_max", type=int, default=6, help="tables for every n_max from 1 to this")
    parser.add_argument("--gamma", type=int, default=16)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--responses", type=Path, default=RESPONSES, help="responses file (gzipped JSONL); another "
                        "file with another --output compares settings, e.g. the shipped sampled responses")
    parser.add_argument("--max_responses", type=int, default=None, help="use the first N responses (default all)")
    parser.add_argument("--temperature", type=float, default=0.0, help="the sampling temperature the responses "
                        "were drawn at (top-k / top-p off): the set this run writes; other temperatures' sets stay")
    parser.add_argument("--rounds", choices=("first", "all"), default="all", help="which simulated rounds the "
                        "means count: each response's first round per match length (what a request without a record "
                        "of its own meets) or all")
    args = parser.parse_args()
    from dspark_jax.evaluation.lookup_simulation import conditional_acceptance
    from dspark_jax.utils.files import atomic_write_text

    with gzip.open(args.responses, "rt") as f:
        rows = [json.loads(line) for line in f][:args.max_responses]
    pairs = [(r["prompt_ids"], r["response_ids"]) for r in rows]
    tables = {}
    for n_max in range(1, args.n_max + 1):  # a match of n tokens means "not n + 1": each n_max has its table
        tested, accepted = conditional_acceptance(pairs, n_max, 1, args.gamma, first_only=args.rounds == "first")
        tables[str(n_max)] = dict(tested=tested, accepted=accepted,
                                  mean=[[round((a + 1) / (t + 2), 4) for a, t in zip(ar, tr)]
                                        for ar, tr in zip(accepted, tested)])
        print(f"n_max={n_max}:", file=sys.stderr)
        for n, row in enumerate(tables[str(n_max)]["mean"], 1):
            print(f"  n={n}: " + " ".join(f"{m:.2f}" for m in row), file=sys.stderr, flush=True)
    source = args.responses.resolve()
    entry = dict(temperature=args.temperature,
                 source=str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else str(source),
                 responses=len(rows), rounds=args.rounds, command=" ".join(["python benchmarks/ngram_prior.py", *sys.argv[1:]]),
                 tables=tables)
    sets = json.loads(args.output.read_text())["sets"] if args.output.exists() else []
    sets = sorted([e for e in sets if e["temperature"] != args.temperature] + [entry], key=lambda e: e["temperature"])
    doc = dict(gamma=args.gamma, n_min=1, sets=sets)
    atomic_write_text(args.output, json.dumps(doc, indent=None) + "\n")
    temperatures = ", ".join(f"{e['temperature']:g}" for e in sets)
    print(f"wrote {args.output} (sets at T = {temperatures})", file=sys.stderr)


if __name__ == "__main__":
    main()

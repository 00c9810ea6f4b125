"""Writes the prior of corpus lookup's acceptance estimates (`dspark_jax/drafters/corpus_prior.json`): per corpus
match length n and draft position k, the conditional acceptance c_k = P(position k accepted | earlier ones
accepted) of the corpus drafts (`drafters.corpus`) in an offline replay of prompt lookup with corpus lookup where
the text has no match (`evaluation.lookup_simulation.corpus_lookup_rounds`) over training responses of the
embedded target. The table used here leaves out every response to the replayed prompts (indices below
--holdout, in both shipped response files), so a response never drafts from its own text: the shipped table,
which holds them all, would over-promise on exactly these prompts. `NgramDrafter` starts every request's corpus
rows from these means (Laplace-smoothed) and moves to its own online counts.

One set per sampling temperature, as `benchmarks/ngram_prior.py`: on responses drawn at temperature T the replay's
"the draft equals the next token" has the expectation E[p_t(x)]. A run writes the set of --temperature and keeps
the others'; each request uses the nearest.

    # the shipped prior: greedy responses 0-255 (T = 0) and the T = 1 responses to the same prompts
    python benchmarks/corpus_prior.py                                                          # ~3 min
    python benchmarks/corpus_prior.py --temperature 1 \
        --responses dspark_jax/data/train/gemma3_270m_t1_responses_seed1.jsonl.gz              # ~3 min
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "dspark_jax" / "drafters" / "corpus_prior.json"
RESPONSES = ROOT / "dspark_jax" / "data" / "train" / "gemma3_270m_greedy_responses.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gamma", type=int, default=16)
    parser.add_argument("--holdout", type=int, default=256, help="replay the responses to prompt indices below this, "
                        "with a table of the shipped responses to the other prompts")
    parser.add_argument("--responses", type=Path, default=RESPONSES, help="the replayed responses (gzipped JSONL)")
    parser.add_argument("--temperature", type=float, default=0.0, help="the sampling temperature the responses "
                        "were drawn at (top-k / top-p off): the set this run writes; other temperatures' sets stay")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    from dspark_jax.drafters.corpus import DATA_DIR, build_table, shipped_corpus_spec
    from dspark_jax.drafters.ngram import CORPUS_N_MIN
    from dspark_jax.evaluation.lookup_simulation import corpus_lookup_rounds, position_outcomes
    from dspark_jax.data.responses import read_responses as read_rows
    from dspark_jax.utils.files import atomic_write_text

    spec = shipped_corpus_spec()
    kept = [r["response_ids"] for name in spec["files"] for r in read_rows(DATA_DIR / name)
            if r["index"] >= args.holdout]
    table = build_table(kept, spec["n_min"], spec["n_max"])
    replayed = [r for r in read_rows(args.responses) if r["index"] < args.holdout]
    print(f"table of {len(kept)} responses ({int(table.hashes.shape[0]):,} n-grams); replaying {len(replayed)}",
          file=sys.stderr)
    n_max = spec["n_max"]
    tested, accepted = np.zeros((n_max, args.gamma), np.int64), np.zeros((n_max, args.gamma), np.int64)
    for i, r in enumerate(replayed):
        for rnd in corpus_lookup_rounds(r["prompt_ids"], r["response_ids"], table, corpus_n_min=CORPUS_N_MIN,
                                        gamma=args.gamma):
            if rnd.source == "corpus" and rnd.room:
                reached, passed = position_outcomes(rnd.accepted, rnd.room, args.gamma)
                tested[rnd.n - 1] += reached
                accepted[rnd.n - 1] += passed
        if (i + 1) % 32 == 0:
            print(f"  {i + 1}/{len(replayed)} responses", file=sys.stderr, flush=True)
    tables = {str(n): dict(tested=tested[n - 1].tolist(), accepted=accepted[n - 1].tolist(),
                           mean=[round((a + 1) / (t + 2), 4) for a, t in zip(accepted[n - 1], tested[n - 1])])
              for n in range(spec["n_min"], n_max + 1)}
    for n, t in tables.items():
        print(f"  n={n}: " + " ".join(f"{m:.2f}" for m in t["mean"]), file=sys.stderr)
    source = args.responses.resolve()
    entry = dict(temperature=args.temperature,
                 source=str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else str(source),
                 responses=len(replayed), holdout=args.holdout,
                 command=" ".join(["python benchmarks/corpus_prior.py", *sys.argv[1:]]), tables=tables)
    sets = json.loads(args.output.read_text())["sets"] if args.output.exists() else []
    sets = sorted([e for e in sets if e["temperature"] != args.temperature] + [entry], key=lambda e: e["temperature"])
    atomic_write_text(args.output, json.dumps(dict(gamma=args.gamma, sets=sets), indent=None) + "\n")
    temperatures = ", ".join(f"{e['temperature']:g}" for e in sets)
    print(f"wrote {args.output} (sets at T = {temperatures})",
          file=sys.stderr)


if __name__ == "__main__":
    main()

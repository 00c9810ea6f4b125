"""Corpus lookup offline: τ of prompt lookup alone, with corpus lookup only where the text has no match (session
52's rule) and with corpus lookup also over a short text match (`drafters.corpus.takes_corpus`, the drafter's rule),
replayed over the target's greedy outputs for held-out prompts (`evaluation.lookup_simulation`:
every draft verified in full, γ tokens; no scheduler, no timing). The outputs come from plain decoding here.

    python benchmarks/corpus_lookup.py [--datasets gsm8k,humaneval,mbpp,mt-bench --limit 32 --max_new_tokens 96
                                        --gamma 15] [--output benchmarks/results/corpus_lookup.json]

Prints one line per set and prompt count (the first 8, the first --limit); writes JSON.
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="gsm8k,humaneval,mbpp,mt-bench")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--gamma", type=int, default=15)
    ap.add_argument("--output", default="benchmarks/results/corpus_lookup.json")
    args = ap.parse_args()
    from dspark_jax.drafters.corpus import shipped_corpus
    from dspark_jax.drafters.ngram import CORPUS_N_MIN
    from dspark_jax.evaluation.datasets import load_benchmark
    from dspark_jax.evaluation.lookup_simulation import corpus_lookup_rounds
    from dspark_jax.generation import GenerationConfig, decode_batches, encode_prompts
    from dspark_jax.target import load_target
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    target = load_target()
    table = shipped_corpus(target.config.fingerprint())
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=8)
    result = dict(machine=describe_machine(), **vars(args), sets={})
    print(f"{'set':<10} {'prompts':>7} {'lookup tau':>10} {'text first':>10} {'+ corpus tau':>12} {'rounds':>13} "
          f"{'corpus rounds':>13} {'corpus drafts accepted':>22}")
    for name in args.datasets.split(","):
        encoded = encode_prompts(target, list(load_benchmark(name, limit=args.limit).prompts), args.max_new_tokens)
        pairs = []
        for start, count, out, _ in decode_batches(target, encoded, config):
            pairs += [(encoded[start + i], [int(t) for t in out.tokens[i][:int(out.num_tokens[i])]])
                      for i in range(count)]
        for limit in sorted({min(8, len(pairs)), len(pairs)}):
            alone, first, both = ([r for p, o in pairs[:limit]
                                   for r in corpus_lookup_rounds(p, o, table, corpus_n_min=CORPUS_N_MIN,
                                                                 gamma=args.gamma, corpus=corpus, text_first=text_first)]
                                  for corpus, text_first in ((False, False), (True, True), (True, False)))
            corpus_rounds = [r for r in both if r.source == "corpus"]
            row = dict(prompts=limit, lookup_tau=sum(r.count for r in alone) / len(alone),
                       text_first_tau=sum(r.count for r in first) / len(first),
                       corpus_tau=sum(r.count for r in both) / len(both), lookup_rounds=len(alone),
                       corpus_lookup_rounds=len(both), corpus_rounds=len(corpus_rounds),
                       corpus_drafts=sum(r.room for r in corpus_rounds),
                       corpus_accepted=sum(r.accepted for r in corpus_rounds))
            result["sets"].setdefault(name, []).append(row)
            print(f"{name:<10} {limit:>7} {row['lookup_tau']:>10.2f} {row['text_first_tau']:>10.2f} "
                  f"{row['corpus_tau']:>12.2f} "
                  f"{len(alone):>6} → {len(both):<5} {len(corpus_rounds):>13} "
                  f"{row['corpus_accepted']:>10} of {row['corpus_drafts']:<8}", flush=True)
    write_result(args.output, result)


if __name__ == "__main__":
    main()

"""Where a hybrid drafter's rounds go in the main job's setting (T = 0, `--draft_length auto`): per held-out set,
rounds by what they verified — nothing (a plain round or a probe that chose no draft), a lookup draft, a model
draft — how many ran the model's forward, and in the rounds that verified a model draft the drafts verified, the
expected accepted ones (Σ_k Π_{i≤k} c_i over the verified drafts, the confidences the scheduler read) against the
accepted ones. No timing comparison: one pass per set.

    python benchmarks/hybrid_rounds.py [--drafter default+ngram] [--datasets gsm8k,humaneval,mbpp,mt-bench]
                                       [--limit 8 --max_new_tokens 96 --batch_size 1 --gamma 15]
                                       [--output benchmarks/results/hybrid_rounds.json]

Prints one line per set; writes JSON.
"""
from __future__ import annotations

import argparse
from collections import Counter


def count_rounds(out, count: int) -> dict:
    """Tallies the rounds of the first `count` requests of one batch's `SpecOutput` (host arrays)."""
    import numpy as np
    tally = Counter()
    verified_model = Counter()
    for i in range(count):
        for j in range(int(out.rounds[i])):
            n, accepted = int(out.proposed[i, j]), int(out.accepted[i, j])
            tally["rounds"] += 1
            tally["model_forward"] += bool(out.model_forward[i, j])
            if n == 0:
                tally["verified_nothing"] += 1
            elif bool(out.lookup_draft[i, j]):
                tally["verified_lookup"] += 1
                tally["lookup_drafts"] += n
                tally["lookup_accepted"] += accepted
            else:
                tally["verified_model"] += 1
                tally["model_drafts"] += n
                tally["model_accepted"] += accepted
                tally["model_expected"] += float(np.cumprod(out.confidence[i, j, :n]).sum())
                verified_model[n] += 1
    return {"tally": dict(tally), "model_drafts_per_round": dict(verified_model)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="default+ngram")
    ap.add_argument("--datasets", default="gsm8k,humaneval,mbpp,mt-bench")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--gamma", type=int, default=15)
    ap.add_argument("--output", default="benchmarks/results/hybrid_rounds.json")
    args = ap.parse_args()

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.generation import GenerationConfig, decode_batches, encode_prompts
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    target = load_target()
    drafter = with_block_size(load_drafter(args.drafter, target, gamma=args.gamma), args.gamma)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, draft_length="auto")
    print(f"machine: {describe_machine()}; {drafter.source}, γ {args.gamma}, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, T = 0, draft length auto")
    sets = {}
    for name in args.datasets.split(","):
        prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path(name))[:args.limit]]
        tally, per_round = Counter(), Counter()
        for _, count, out, _ in decode_batches(target, encode_prompts(target, prompts, args.max_new_tokens), cfg,
                                               drafter):
            counted = count_rounds(out, count)
            tally.update(counted["tally"])
            per_round.update(counted["model_drafts_per_round"])
        t = {k: tally.get(k, 0) for k in ("rounds", "model_forward", "verified_nothing", "verified_lookup",
                                           "verified_model", "lookup_drafts", "lookup_accepted", "model_drafts",
                                           "model_accepted", "model_expected")}
        sets[name] = {**t, "model_drafts_per_round": dict(sorted(per_round.items()))}
        print(f"{name:<10} rounds {t['rounds']:4d}: model forward {t['model_forward']:3d}; verified nothing "
              f"{t['verified_nothing']:3d}, a lookup draft {t['verified_lookup']:3d} ({t['lookup_accepted']} of "
              f"{t['lookup_drafts']} accepted), a model draft {t['verified_model']:3d} ({t['model_accepted']} of "
              f"{t['model_drafts']} accepted, {t['model_expected']:.1f} expected; drafts per round "
              f"{dict(sorted(per_round.items()))})", flush=True)
    write_result(args.output, {"machine": describe_machine(), **vars(args), "sets": sets})


if __name__ == "__main__":
    main()

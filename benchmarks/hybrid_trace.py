"""Per round, which draft the hybrid chose and what the other one would have given, T = 0, batch 1.

    python benchmarks/hybrid_trace.py [--datasets humaneval --limit 8 --max_new_tokens 96 --gamma 7]

At T = 0 a draft's accepted length is the longest prefix of it that equals the target's greedy continuation,
which the finished output holds: each round logs (from inside the jitted loop, `jax.debug.callback`) both
proposals, their expected accepted lengths and the choice, and both accepted lengths are computed afterwards.
The model is run in every round here, also where the hybrid skips it, so a skipped round has a counterfactual
too. Prints, per set: τ, the τ of choosing the better draft in every round (an upper bound on what a better
choice rule gains on these rounds; rounds would shift with other choices), and the lost tokens by the lookup's
match length and the choice. Writes JSON with every round (accepted lengths, not the drafts).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses


def accepted(draft, length, continuation) -> int:
    """Drafts accepted at T = 0: the longest prefix of draft[:length] equal to the continuation."""
    n = 0
    for d, c in zip(draft[:length], continuation):
        if d != c:
            break
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="humaneval")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--model", default="default", help="the trained drafter (a --drafter value)")
    ap.add_argument("--lookup", default="ngram:n_max=3,n_min=1")
    ap.add_argument("--output", default="benchmarks/results/hybrid_trace.json")
    args = ap.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.drafters.factory import Drafter, hybrid_drafter, load_drafter, with_block_size
    from dspark_jax.drafters.hybrid import HybridDrafter
    from dspark_jax.drafters.ngram import find_match
    from dspark_jax.generation import GenerationConfig, encode_prompts, generate_text, release_compiled_programs
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    rounds: list[dict] = []

    def log(start, use, l_tok, l_len, l_exp, n, m_tok, m_len, m_score, skip):
        rounds.append(dict(start=int(start[0]), lookup_chosen=bool(use[0]), lookup=np.asarray(l_tok[0]).tolist(),
                           lookup_len=int(l_len[0]), lookup_expected=float(l_exp[0]), match_len=int(n[0]),
                           model=np.asarray(m_tok[0]).tolist(), model_len=int(m_len[0]),
                           model_expected=float(m_score[0]), model_skipped=bool(skip)))

    class TracedHybrid(HybridDrafter):
        def propose(self, target_model, state, anchor, start, key, params, mode, head, model_pays=None):
            chosen = super().propose(target_model, state, anchor, start, key, params, mode, head, model_pays)
            by_lookup = self.lookup.propose(target_model, state.lookup, anchor, start, key, params, mode, head)
            by_model = self.model.propose(target_model, state.model, anchor, start, key, params, mode, head)
            by_model = dataclasses.replace(by_model, confidence=self.model_confidence(state, by_model.confidence))
            rows = jax.numpy.arange(anchor.shape[0])
            _, n = find_match(state.lookup.tokens.at[rows, start].set(anchor.astype(jax.numpy.int32)), start,
                              self.lookup.config.n_max, self.lookup.config.n_min)
            skip = chosen.model_skipped[0]  # the round's own decision (the loop's pricing included)
            jax.debug.callback(log, start, chosen.deterministic, by_lookup.tokens, by_lookup.num_drafted,
                               by_lookup.expected_accept_length, n, by_model.tokens, by_model.num_drafted,
                               self.model_expects(state, by_model, params), skip)
            return chosen

    target = load_target()

    model = with_block_size(load_drafter(args.model, target, gamma=args.gamma), args.gamma)
    hybrid = with_block_size(hybrid_drafter(model, target, args.lookup), args.gamma)
    module = nnx.merge(hybrid.graphdef, hybrid.state)
    module.__class__ = TracedHybrid
    graphdef, state = nnx.split(module)
    traced = Drafter(hybrid.config, graphdef, state, hybrid.source + " (traced)")
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=1)
    out = []
    print(f"machine: {describe_machine()}; T=0, gamma {args.gamma}, batch 1, {args.max_new_tokens} new tokens")
    for name in args.datasets.split(","):
        prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path(name))[:args.limit]]
        set_rounds = []
        for i, prompt in enumerate(prompts):
            rounds.clear()
            res = generate_text(target, [prompt], cfg, drafter=traced)[0]
            ids = encode_prompts(target, [prompt], args.max_new_tokens)[0] + list(res.completion_ids)
            for r in rounds:
                cont = ids[r["start"] + 1:r["start"] + 1 + args.gamma]
                r.update(prompt=i, lookup_accepted=accepted(r["lookup"], r["lookup_len"], cont),
                         model_accepted=accepted(r["model"], r["model_len"], cont))
                r["chosen_accepted"] = r["lookup_accepted"] if r["lookup_chosen"] else r["model_accepted"]
            set_rounds += [{k: v for k, v in r.items() if k not in ("lookup", "model")} for r in rounds]
        release_compiled_programs()
        k = len(set_rounds)
        tau = sum(r["chosen_accepted"] + 1 for r in set_rounds) / k
        best = sum(max(r["lookup_accepted"], r["model_accepted"]) + 1 for r in set_rounds) / k
        only_l = sum(r["lookup_accepted"] + 1 for r in set_rounds) / k
        only_m = sum(r["model_accepted"] + 1 for r in set_rounds) / k
        lost = collections.defaultdict(lambda: [0, 0, 0])  # (choice, match length) -> rounds, lost tokens, losing
        for r in set_rounds:
            key = ("lookup" if r["lookup_chosen"] else "model", r["match_len"])
            gap = max(r["lookup_accepted"], r["model_accepted"]) - r["chosen_accepted"]
            lost[key][0] += 1
            lost[key][1] += gap
            lost[key][2] += gap > 0
        print(f"\n{name}: {k} rounds, tau {tau:.2f}; best-of-two per round {best:.2f}; "
              f"on these rounds lookup alone {only_l:.2f}, model alone {only_m:.2f}")
        print(f"{'chosen':<8} {'match n':>7} {'rounds':>7} {'losing':>7} {'lost tokens':>12} {'lost/round':>11}")
        for (choice, n), (cnt, gap, losing) in sorted(lost.items()):
            print(f"{choice:<8} {n:>7} {cnt:>7} {losing:>7} {gap:>12} {gap / cnt:>11.2f}")
        out.append(dict(dataset=name, rounds=set_rounds, tau=tau, best_of_two=best, lookup_only=only_l,
                        model_only=only_m))
        write_result(args.output, dict(machine=describe_machine(), target=target.config.name, **vars(args),
                                       sets=out))


if __name__ == "__main__":
    main()

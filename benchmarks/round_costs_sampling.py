"""What sampling adds to a round of the jitted loop: the round-cost profile (`round_costs.profile_round_costs`) of
each drafter taken greedy and sampled, one after the other in one process, each bucket's cost as a multiple of
its own profile's plain round. A sampled round computes the target's softmax statistics over every verified
row, the rejection draw and the drafter's sampling, which greedy rounds skip at run time; before session 22 the
loop's gate priced sampled runs with the greedy profile.

    python benchmarks/round_costs_sampling.py [--drafters "ngram,default+ngram" --batch_sizes 1 --gamma 7
                                               --temperature 1 --top_k 0 --top_p 1]

Prints a table per drafter and batch, writes JSON (nothing is read from or written to the profile cache).
"""
from __future__ import annotations

import argparse


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafters", default="ngram,default+ngram", help="--drafter values, comma-separated")
    ap.add_argument("--batch_sizes", default="1")
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--output", default="benchmarks/results/round_costs_sampling.json")
    args = ap.parse_args()
    if args.temperature <= 0:
        raise SystemExit(f"--temperature must be > 0 (the sampled profile), got {args.temperature}")

    from dspark_jax.decoding.draft_length import profile_buckets
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.round_costs import profile_round_costs
    from dspark_jax.target import load_target
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    target = load_target()
    rows = []
    print(f"machine: {describe_machine()}; sampled at T={args.temperature:g}, top-k {args.top_k}, top-p "
          f"{args.top_p:g}; gamma {args.gamma}")
    for spec in args.drafters.split(","):
        drafter = with_block_size(load_drafter(spec, target, gamma=args.gamma), args.gamma)
        for bs in map(int, args.batch_sizes.split(",")):
            buckets = profile_buckets(bs, args.gamma)
            kinds = {}
            for kind, t in (("greedy", 0.0), ("sampled", args.temperature)):
                print(f"[{spec} batch {bs}] {kind} profile ...", flush=True)
                kinds[kind] = profile_round_costs(target, drafter, bs, buckets, prompt_len=args.prompt_len,
                                                  max_new_tokens=args.max_new_tokens, temperature=t,
                                                  top_k=args.top_k, top_p=args.top_p)
            g, s = kinds["greedy"], kinds["sampled"]
            print(f"\n{spec}, batch {bs}: plain round {g.plain * 1e3:.1f} ms greedy, {s.plain * 1e3:.1f} ms sampled")
            print(f"{'bucket (rows)':>14} {'greedy ms':>10} {'x plain':>8} {'sampled ms':>11} {'x plain':>8} "
                  f"{'sampled/greedy ratio':>21}")
            for i, t in enumerate(buckets):
                gr, sr = g.seconds[i] / g.plain, s.seconds[i] / s.plain
                print(f"{t:>14} {g.seconds[i] * 1e3:>10.1f} {gr:>8.2f} {s.seconds[i] * 1e3:>11.1f} {sr:>8.2f} "
                      f"{sr / gr:>21.3f}")
                rows.append(dict(drafter=spec, batch_size=bs, bucket=t, greedy_s=g.seconds[i], greedy_plain_s=g.plain,
                                 sampled_s=s.seconds[i], sampled_plain_s=s.plain, greedy_x_plain=gr,
                                 sampled_x_plain=sr))
            print()
    write_result(args.output, dict(machine=describe_machine(), temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, gamma=args.gamma, rows=rows))


if __name__ == "__main__":
    main()

"""How repeatable is a round-cost profile, and does its noise change what the gate compiles? The same profile's
timings (`round_costs.time_rounds`) taken --profiles times in one process (nothing read from or written to the
profile cache), for each number of timing passes in --passes, each reduced by two estimators: "independent"
(`RoundTimings.costs`, what the loop uses: each bucket's median seconds over the passes) and "paired" (each round
as a multiple of its own pass's plain round, median over passes: drift of the machine's speed between passes
would cancel). Per estimator and bucket: the median and range over the profiles of its cost as a multiple of
that profile's plain round, how often it looks cheaper than a smaller bucket (a non-monotone cost: noise, or a
real step such as a GEMM tile), and the efficient buckets each profile yields (`draft_length.efficient_buckets`:
what `--draft_length auto` compiles).

    python benchmarks/profile_repeatability.py [--drafters ngram --batch_size 1 --gamma 7 --profiles 5
                                                --passes 5,15 --prompt_len 64 --max_new_tokens 96]

Prints a table per drafter, pass count and estimator, writes JSON.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import statistics
import time


def paired_costs(timings):
    """`RoundCosts` from `RoundTimings`, each round priced as a multiple of the plain round of its own pass
    (median over passes) times the median plain round; clipped to at least a plain round."""
    from dspark_jax.round_costs import RoundCosts
    plain = statistics.median(timings.plain)
    tables = [tuple(max(statistics.median(t / q for t, q in zip(times, timings.plain)), 1.0) * plain
                    for times in variant) for variant in timings.rounds]
    return RoundCosts(timings.batch, timings.buckets, tables[0], plain,
                      lookup_seconds=tables[1] if len(tables) > 1 else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafters", default="ngram", help="--drafter values, comma-separated")
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--profiles", type=int, default=5, help="profiles taken per drafter and pass count")
    ap.add_argument("--passes", default="5,15", help="timing passes per profile (profile_round_costs' repeats; the "
                    "loop's default is 5), comma-separated")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--output", default="benchmarks/results/profile_repeatability.json")
    args = ap.parse_args()
    passes = [int(p) for p in args.passes.split(",")]
    if args.profiles < 2 or min(passes) < 1:
        raise SystemExit(f"need --profiles >= 2 and passes >= 1, got {args.profiles} and {args.passes!r}")

    import numpy as np

    from dspark_jax.decoding.draft_length import profile_buckets
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.round_costs import time_rounds
    from dspark_jax.target import load_target
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    target = load_target()
    buckets = profile_buckets(args.batch_size, args.gamma)
    print(f"machine: {describe_machine()}; batch {args.batch_size}, gamma {args.gamma}, buckets {buckets}")
    results = []
    for spec in args.drafters.split(","):
        drafter = with_block_size(load_drafter(spec, target, gamma=args.gamma), args.gamma)
        for n_passes in passes:
            timings, elapsed = [], []
            for k in range(args.profiles):
                print(f"[{spec}, {n_passes} passes] profile {k + 1}/{args.profiles} ...", flush=True)
                t0 = time.perf_counter()
                timings.append(time_rounds(target, drafter, args.batch_size, buckets, prompt_len=args.prompt_len,
                                           max_new_tokens=args.max_new_tokens, repeats=n_passes))
                elapsed.append(time.perf_counter() - t0)
            plains = [statistics.median(t.plain) for t in timings]
            print(f"\n{spec}, {n_passes} passes, {args.profiles} profiles (first one includes compilation: "
                  f"{elapsed[0]:.0f} s, then {np.median(elapsed[1:]):.0f} s each); plain round "
                  f"{np.median(plains) * 1e3:.1f} ms [{min(plains) * 1e3:.1f}, {max(plains) * 1e3:.1f}]")
            row = dict(drafter=spec, passes=n_passes, profiles=args.profiles, seconds_per_profile=elapsed,
                       plain_s=plains, timings=[dataclasses.asdict(t) for t in timings], estimators={})
            for estimator in ("independent", "paired"):
                costs = [t.costs() if estimator == "independent" else paired_costs(t) for t in timings]
                chosen = collections.Counter(c.efficient()[0] for c in costs)
                out = dict(efficient_buckets={",".join(map(str, b)): n for b, n in chosen.items()})
                for name in ("seconds", "lookup_seconds"):
                    if getattr(costs[0], name) is None:
                        continue
                    x = np.asarray([[s / c.plain for s in getattr(c, name)] for c in costs])  # [profiles, buckets]
                    below = x[:, None, :] < x[:, :, None]  # below[p, i, j]: bucket j cheaper than bucket i
                    smaller = np.arange(len(buckets))[:, None] < np.arange(len(buckets))[None, :]
                    cheaper = (below & smaller[None]).any(1).mean(0)  # per bucket, fraction of profiles
                    spread = (x.max(0) - x.min(0)) / np.median(x, 0)
                    kind = "model's forward run" if name == "seconds" and len(timings[0].rounds) > 1 else \
                        "model skipped" if name == "lookup_seconds" else "rounds"
                    print(f"  {estimator}, {kind}: mean spread {spread.mean() * 100:.1f} %")
                    print(f"{'bucket':>9} {'median x plain':>15} {'range':>15} {'spread %':>9} "
                          f"{'cheaper than a smaller bucket':>30}")
                    for i, t in enumerate(buckets):
                        print(f"{t:>9} {np.median(x[:, i]):>15.2f} {f'[{x[:, i].min():.2f}, {x[:, i].max():.2f}]':>15} "
                              f"{spread[i] * 100:>9.1f} {cheaper[i] * 100:>29.0f}%")
                    out[name] = dict(x_plain=x.tolist(), spread=spread.tolist(), cheaper_than_smaller=cheaper.tolist())
                for b, n in chosen.most_common():
                    print(f"  efficient buckets {b}: {n} of {args.profiles} profiles")
                row["estimators"][estimator] = out
            print()
            results.append(row)
            write_result(args.output, dict(machine=describe_machine(), **vars(args), buckets=list(buckets),
                                           rows=results))


if __name__ == "__main__":
    main()

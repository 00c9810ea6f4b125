"""How repeatable is the serving engine's SPS(B) profile (`Engine.profile_timings`), and how often does it time a
draft step faster than the draft-free step? The same engine (compiled once per slot count) is profiled
--profiles times under each setting in --settings (`steps x passes`), the settings taking turns, nothing cached.
Per setting and bucket: the median and range over the profiles of the draft step's time as a multiple of that
profile's draft-free step, the spread (range / median), and the fraction of profiles in which the draft step at
some bucket looks faster than the draft-free step — for a drafter that runs a model forward in every draft step
(DSpark, the hybrid at these prompts) that is noise, and it makes the scheduler draft where it should not
(BENCHMARKS.md "Session 24": the hybrid at 4 slots, 0.95x plain).

    python benchmarks/engine_profile_repeatability.py [--drafter default+ngram --slots 1,4 --profiles 5
                                                       --settings 5x1,3x3 --max_len 512]

`5x1` is session 24's step count in one pass (the draft-free step now timed first and last, warm-ups up front);
`3x3` the engine's default since session 25. Prints a table per slot count and setting, writes JSON.
"""
from __future__ import annotations

import argparse
import time


def parse_settings(text: str) -> list[tuple[int, int]]:
    """'5x1,3x3' → [(5, 1), (3, 3)] (steps per pass, passes)."""
    out = []
    for item in text.split(","):
        steps, _, passes = item.partition("x")
        try:
            out.append((int(steps), int(passes)))
        except ValueError:
            raise SystemExit(f"--settings items are STEPSxPASSES, got {item!r}") from None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="default+ngram")
    ap.add_argument("--slots", default="1,4", help="slot counts, comma-separated")
    ap.add_argument("--profiles", type=int, default=5, help="profiles per setting and slot count")
    ap.add_argument("--settings", default="5x1,3x3", help="STEPSxPASSES per profile, comma-separated")
    ap.add_argument("--max_len", type=int, default=512)
    ap.add_argument("--output", default="benchmarks/results/engine_profile_repeatability.json")
    args = ap.parse_args()
    settings = parse_settings(args.settings)
    if args.profiles < 2:
        raise SystemExit(f"need --profiles >= 2, got {args.profiles}")

    import numpy as np

    from dspark_jax.cli.common import load_target_and_drafter
    from dspark_jax.serving.cost_table import CostTable
    from dspark_jax.serving.engine import Engine, EngineConfig
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    target, drafter = load_target_and_drafter("gemma3-270m", args.drafter)
    print(f"machine: {describe_machine()}; drafter {args.drafter}")
    rows = []
    for slots in (int(s) for s in args.slots.split(",")):
        placeholder = CostTable((slots,), (1.0,))  # skips the profile at start; every profile below is taken here
        t0 = time.perf_counter()
        engine = Engine(target, drafter, EngineConfig(slots=slots, max_len=args.max_len, policy="scheduler"),
                        cost_table=placeholder)
        print(f"{slots} slots: compiled in {time.perf_counter() - t0:.0f} s; buckets {engine.buckets}", flush=True)
        taken = {s: [] for s in settings}
        seconds = {s: [] for s in settings}
        for k in range(args.profiles):
            for steps, passes in settings:
                print(f"[{slots} slots] profile {k + 1}/{args.profiles}, {steps}x{passes} ...", flush=True)
                t0 = time.perf_counter()
                taken[(steps, passes)].append(engine.profile_timings(steps=steps, passes=passes))
                seconds[(steps, passes)].append(time.perf_counter() - t0)
        for steps, passes in settings:
            profiles = taken[(steps, passes)]
            plain = np.asarray([np.median(p["plain"]) for p in profiles])
            x = np.asarray([[np.median(p[b]) for b in engine.buckets] for p in profiles]) / plain[:, None]
            spread = (x.max(0) - x.min(0)) / np.median(x, 0)
            faster = (x < 1.0).any(1).mean()
            print(f"\n{slots} slots, {steps} steps x {passes} passes, {args.profiles} profiles "
                  f"({np.median(seconds[(steps, passes)]):.1f} s each): draft-free step "
                  f"{np.median(plain) * 1e3:.1f} ms [{plain.min() * 1e3:.1f}, {plain.max() * 1e3:.1f}]; "
                  f"mean spread {spread.mean() * 100:.1f} %; a draft step timed faster than the draft-free one in "
                  f"{faster * 100:.0f} % of profiles")
            print(f"{'bucket':>8} {'median x draft-free':>20} {'range':>16} {'spread %':>9}")
            for i, b in enumerate(engine.buckets):
                print(f"{b:>8} {np.median(x[:, i]):>20.2f} {f'[{x[:, i].min():.2f}, {x[:, i].max():.2f}]':>16} "
                      f"{spread[i] * 100:>9.1f}")
            rows.append(dict(slots=slots, steps=steps, passes=passes, buckets=list(engine.buckets),
                             seconds_per_profile=seconds[(steps, passes)], plain_s=plain.tolist(),
                             x_plain=x.tolist(), spread=spread.tolist(), draft_faster_than_plain=float(faster),
                             timings=[{str(key): v for key, v in p.items()} for p in profiles]))
        print()
        write_result(args.output, dict(machine=describe_machine(), **vars(args), rows=rows))
        del engine


if __name__ == "__main__":
    main()

"""What attending over the shortest compiled cache length buys the serving engine (`EngineConfig.kv_buckets`,
session 26): the same closed-loop load (`serving.closed_loop`) on two engines that differ only in their cache
lengths — the ladder of `--kv_buckets=auto` (powers of two from 128, and max_len) vs max_len alone (every step attends
over all rows: the engine's default) — taking turns, `--repeats` times per slot count. Both engines share
one SPS profile (taken by the ladder engine, as it would at start), so at T = 0 they make the same choices and
commit the same tokens (τ is printed as the check); only the step's cost differs. Also times each engine's
compilation.

    python benchmarks/engine_kv_buckets.py [--drafter default+ngram --policy scheduler --slots 1,4
                                            --max_len 512 --repeats 2 --requests_per_client 3 --max_new_tokens 64]

Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="default+ngram")
    ap.add_argument("--policy", default="scheduler", help="plain | fixedN | threshold | scheduler | scheduler_async")
    ap.add_argument("--slots", default="1,4", help="slot counts = concurrent clients, comma-separated")
    ap.add_argument("--max_len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="closed-loop runs per engine and slot count")
    ap.add_argument("--requests_per_client", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--max_prompt_tokens", type=int, default=256)
    ap.add_argument("--prompt_sets", default="humaneval,gsm8k,mt-bench")
    ap.add_argument("--output", default="benchmarks/results/engine_kv_buckets.json")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"need --repeats >= 1, got {args.repeats}")

    import jax
    import numpy as np

    from dspark_jax.cli.common import load_target_and_drafter, positive_ints
    from dspark_jax.evaluation.datasets import load_benchmarks
    from dspark_jax.serving.closed_loop import closed_loop, engine_config
    from dspark_jax.serving.cost_table import CostTable
    from dspark_jax.serving.engine import Engine
    from dspark_jax.serving.engine_config import kv_buckets
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    slot_counts = positive_ints(args.slots, "slots")
    variants = {"ladder": kv_buckets(args.max_len), "max_len only": (args.max_len,)}
    for kv in variants.values():
        engine_config(args.policy, max_len=args.max_len, kv_buckets=kv)  # validates before anything slow
    target, drafter = load_target_and_drafter("gemma3-270m", args.drafter)
    sets = load_benchmarks([s for s in args.prompt_sets.split(",") if s])
    per_set = [[target.tokenizer.encode(p, add_bos=True)[:args.max_prompt_tokens] for p in b.prompts] for b in sets]
    prompts = [p for group in zip(*per_set) for p in group]
    print(f"machine: {describe_machine()}; drafter {args.drafter}, policy {args.policy}")
    rows = []
    for slots in slot_counts:
        engines, compile_s = {}, {}
        placeholder = CostTable((slots,), (1.0,))  # skips the profile at start: compile times compare alone
        for name, kv in variants.items():
            jax.clear_caches()  # else the second engine reuses the first's executables at max_len
            t0 = time.perf_counter()
            engines[name] = Engine(target, drafter, engine_config(args.policy, slots=slots, max_len=args.max_len,
                                                                  kv_buckets=kv), cost_table=placeholder)
            compile_s[name] = time.perf_counter() - t0
            print(f"[{slots} slots] {name}: cache lengths {engines[name].kv_buckets}, compiled in "
                  f"{compile_s[name]:.0f} s", flush=True)
        if args.policy.startswith("scheduler"):
            table = engines["ladder"].profile()
            for engine in engines.values():
                engine.set_cost_table(table)
        runs = {name: [] for name in variants}
        for r in range(args.repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                res = closed_loop(engines[name], args.policy, prompts, slots, args.requests_per_client,
                                  args.max_new_tokens)
                kv_steps = dict(engines[name].kv_counts)
                runs[name].append(dict(aggregate_tps=res.aggregate_tps, accept_length=res.accept_length,
                                       steps=res.steps, plain_steps=res.plain_steps, kv_steps_total=kv_steps))
                print(f"[{slots} slots] repeat {r + 1} {name}: {res.aggregate_tps:.2f} tok/s, τ {res.accept_length:.2f}, "
                      f"{res.steps} steps ({res.plain_steps} draft-free)", flush=True)
        tps = {name: float(np.median([x["aggregate_tps"] for x in runs[name]])) for name in variants}
        rows.append(dict(slots=slots, compile_s=compile_s, runs=runs, median_tps=tps,
                         speedup=tps["ladder"] / tps["max_len only"],
                         kv_steps=dict(engines["ladder"].kv_counts)))
        write_result(args.output, dict(command=" ".join(["python benchmarks/engine_kv_buckets.py"] + [
            f"--{k}={v}" for k, v in vars(args).items()]), machine=describe_machine(), rows=rows))
        del engines
    print("\n| slots | ladder tok/s | max_len only tok/s | speed-up | τ ladder / max_len only | steps per cache length "
          "(ladder) | build s: ladder / max_len only |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        taus = "/".join(f"{np.mean([x['accept_length'] for x in row['runs'][n]]):.2f}" for n in variants)
        print(f"| {row['slots']} | {row['median_tps']['ladder']:.2f} | {row['median_tps']['max_len only']:.2f} | "
              f"{row['speedup']:.3f}x | {taus} | {row['kv_steps']} | "
              f"{row['compile_s']['ladder']:.0f} / {row['compile_s']['max_len only']:.0f} |")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""What the jitted speculative loop costs beyond the target's forward: the loop with every round plain (a cost
model under which drafting never pays, so the gate keeps the drafter off after its first probe) against plain
decoding (`decoding.autoregressive.generate`), same batch, same run; and the loop verifying every proposal.

    python benchmarks/loop_overhead.py [--datasets mbpp --batch_size 8 --gamma 11 --repeats 3 --limit 0
                                        --drafters "ngram,default+ngram|g=7" --loops plain,verified]

At T = 0 all loops decode the same tokens (greedy; checked); at --temperature > 0 (no top-k / top-p) each draws
its own sample, and every ratio below is of time per generated token. The ratio of wall times (best of --repeats, compilation excluded;
the repeats interleave plain decoding and every loop, so a slow minute of a noisy machine hits all of them; also
the median and range over repeats of each run's time over plain decoding's run of the same repeat — paired)
is the loop's overhead per round: its bookkeeping, the drafter's commit (for a model drafter in the hybrid:
its context update from the target's features, in every round), and anything XLA adds around the
conditionals of a round (before session 11, a copy of the whole KV cache in every round). The 'auto' loop is
what `--draft_length auto` runs (the cached round-cost profile of this machine, `round_costs`), timed in the
same interleaving: auto against every-round-plain is what the gate's choices cost or gain. The drafter's head
rows (`draft_head`) are gathered once per run and passed to every call, as `generation.decode_batches` does
('auto_head_inside': gathered in every call, as before session 34). Writes JSON.
"""
from __future__ import annotations

import argparse
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mbpp")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--gamma", type=int, default=11)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="prompts per set, decoded in batches of --batch_size "
                    "(times summed per repeat); 0: one batch")
    ap.add_argument("--drafters", default="ngram", help="--drafter values (load_drafter), each optionally "
                    "followed by |g=N (its gamma, default --gamma), comma-separated")
    ap.add_argument("--loops", default="plain,verified", help="which loops per drafter: 'plain' (every round "
                    "plain), 'verified' (every proposal verified), 'auto' (the profiled gate), 'auto_one_table' "
                    "(the gate pricing a hybrid's rounds that skip its model by the table with the model, as "
                    "before session 23), 'auto_no_record' (without the progress record, as before session 33), "
                    "'auto_step_buckets' (that, with the buckets kept before session 33), 'auto_head_inside' "
                    "(the drafter's head rows gathered in every call, as before session 34), comma-separated")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    ap.add_argument("--max_buckets", type=int, default=5, help="buckets the auto loops compile")
    ap.add_argument("--output", default="benchmarks/results/loop_overhead.json")
    args = ap.parse_args()
    loop_names = {"plain", "verified", "auto", "auto_one_table", "auto_step_buckets", "auto_no_record",
                  "auto_head_inside"}
    if set(args.loops.split(",")) - loop_names:
        raise SystemExit(f"--loops takes {sorted(loop_names)}, got {args.loops!r}")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.decoding.autoregressive import generate
    from dspark_jax.decoding.speculative import draft_head, speculative_generate
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.generation import encode_prompts, pad_batch
    from dspark_jax.round_costs import load_or_profile_round_costs
    from dspark_jax.sampling import SamplingParams
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    target = load_target()
    drafters = {}
    for entry in args.drafters.split(","):  # "<--drafter value>[|g=N]" (N: its γ, default --gamma)
        spec, _, g = entry.partition("|g=")
        gamma = int(g or args.gamma)
        drafter = load_drafter(spec, target, gamma=gamma)
        drafters[entry] = with_block_size(drafter, gamma)
    heads = {entry: draft_head(target.graphdef, target.state, d.graphdef, d.state)  # as generation does
             for entry, d in drafters.items()}
    bs = args.batch_size

    executables = {}
    buckets_of = {}  # (drafter spec, loop label) → the verification buckets compiled (last batch's)

    def compiled(key, fn, call_args, static):
        """fn compiled once per run and prompt width (batches of one width share it), bound to call_args."""
        key = (key, call_args["prompts"].shape)
        if key not in executables:
            executables[key] = fn.lower(**call_args, **static).compile()
        exe = executables[key]
        return lambda: jax.block_until_ready(exe(**call_args))

    def interleaved(runs: dict) -> dict:
        """label → (seconds of every repeat, output): every run once per repeat, in turn."""
        outs = {k: run() for k, run in runs.items()}  # warm-up
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t0)
        return {k: (times[k], outs[k]) for k in runs}

    def batch_runs(encoded) -> dict:
        """(drafter spec, loop label) → a compiled run of one batch (("plain", ""): plain decoding)."""
        tokens, lens = pad_batch(encoded, target.config.pad_token_id, bs)
        common = dict(prompts=jnp.asarray(tokens), prompt_lens=jnp.asarray(lens),
                      key=jax.random.split(jax.random.key(0), bs), params=SamplingParams.create(bs, args.temperature, 0, 1.0))
        static = dict(max_new_tokens=args.max_new_tokens, stop_ids=target.stop_ids, pad_id=target.config.pad_token_id)
        runs = {("plain", ""): compiled(("plain", ""), generate, dict(common, state=target.state),
                                        dict(static, graphdef=target.graphdef))}
        for spec, drafter in drafters.items():
            buckets = (bs, 2 * bs, bs * (drafter.config.block_size + 1))
            inside = dict(common, target_state=target.state, drafter_state=drafter.state,
                          confidence_threshold=jnp.float32(0.0))
            spec_args = inside if heads[spec] is None else dict(inside, head=heads[spec])
            loops = {"plain": ("every round plain", dict(verify_buckets=buckets, verify_costs=(1.0, 2.0, 5.0),
                                                         plain_cost=1e-6)),
                     "verified": ("every proposal verified", dict(verify_buckets=buckets))}
            if set(args.loops.split(",")) - {"plain", "verified"}:  # draft length "auto" and its variants
                costs = load_or_profile_round_costs(target, drafter, bs, int(tokens.shape[1]), args.max_new_tokens,
                                                    temperature=args.temperature)
                settings = costs.loop_settings(args.max_buckets)
                loops["auto"] = ("auto (profiled gate)", settings)
                one_table = {k: v for k, v in settings.items() if k != "lookup_costs"}
                loops["auto_one_table"] = ("auto, one cost table", one_table)
                loops["auto_step_buckets"] = ("auto, step buckets, no record",
                                              dict(step_bucket_settings(costs, args.max_buckets), progress_prior=None))
                loops["auto_no_record"] = ("auto, no progress record", dict(settings, progress_prior=None))
                loops["auto_head_inside"] = ("auto, head gathered inside", settings)
            for key in args.loops.split(","):
                label, extra = loops[key]
                buckets_of[(spec, label)] = extra.get("verify_buckets")
                runs[(spec, label)] = compiled((spec, label), speculative_generate,
                                               inside if key == "auto_head_inside" else spec_args,
                                               dict(static, target_graphdef=target.graphdef,
                                                    drafter_graphdef=drafter.graphdef, **extra))
        return runs

    def summed(parts: list) -> tuple:
        """Batches' (times, output) → (times summed per repeat, [outputs])."""
        return [sum(ts) for ts in zip(*(t for t, _ in parts))], [o for _, o in parts]

    rows = []
    print(f"machine: {describe_machine()}; batch {bs}, {args.max_new_tokens} new tokens, gamma {args.gamma}")
    print(f"{'dataset':<10} {'drafter':<14} {'loop':<24} {'seconds':>8} {'rounds':>7} {'plain decoding s':>17} "
          f"{'ratio':>6} {'paired':>7} [range]")
    for name in args.datasets.split(","):
        prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path(name))[:args.limit or bs]]
        encoded = encode_prompts(target, prompts, args.max_new_tokens)
        per_batch = [interleaved(batch_runs(encoded[i:i + bs])) for i in range(0, len(encoded), bs)]
        timed = {k: summed([b[k] for b in per_batch]) for k in per_batch[0]}
        plain_times, plain = timed.pop(("plain", ""))
        plain_s = min(plain_times)
        plain_tokens = sum(int(np.asarray(o.num_tokens).sum()) for o in plain)
        for (spec, label), (times, outs) in timed.items():
            same = all(bool((np.asarray(o.tokens) == np.asarray(p.tokens)).all()) for o, p in zip(outs, plain))
            tokens = sum(int(np.asarray(o.num_tokens).sum()) for o in outs)
            per_token = plain_tokens / tokens  # 1 at T = 0 (the same tokens)
            paired = [t / p * per_token for t, p in zip(times, plain_times)]  # against plain decoding's run next to it
            seconds = min(times)
            ratio = seconds / plain_s * per_token
            rows.append(dict(dataset=name, batch_size=bs, temperature=args.temperature, drafter=spec, loop=label,
                             seconds=seconds, rounds=sum(int(np.asarray(o.rounds).max()) for o in outs),
                             tokens=tokens, plain_decoding_s=plain_s,
                             plain_tokens=plain_tokens, ratio=ratio, paired_ratio_median=float(np.median(paired)),
                             paired_ratios=paired, times=times, plain_decoding_times=plain_times,
                             identical_to_plain=same, verify_buckets=buckets_of[(spec, label)]))
            print(f"{name:<10} {spec:<14} {label:<24} {seconds:8.2f} {rows[-1]['rounds']:7d} {plain_s:17.2f} "
                  f"{ratio:6.2f} {np.median(paired):7.3f} [{min(paired):.3f}, {max(paired):.3f}]",
                  flush=True)
        write_result(args.output, dict(machine=describe_machine(), **vars(args), rows=rows))


def step_bucket_settings(costs, max_buckets: int) -> dict:
    """The auto loop's settings with the buckets kept by the rule before session 33: the ends, and among the
    buckets cheaper than every larger one those with the largest absolute cost step to their next larger kept
    neighbour (it favours large buckets; `draft_length.efficient_buckets` now minimises the rounding waste)."""
    from dspark_jax.decoding.draft_length import undominated_buckets
    keep = undominated_buckets(costs.seconds)
    if len(keep) > max_buckets:
        inner = keep[1:-1]
        saving = {i: costs.seconds[keep[keep.index(i) + 1]] - costs.seconds[i] for i in inner}
        keep = [keep[0]] + sorted(sorted(inner, key=lambda i: -saving[i])[:max_buckets - 2]) + [keep[-1]]
    return costs.settings_at(tuple(costs.buckets[i] for i in keep))


if __name__ == "__main__":
    main()

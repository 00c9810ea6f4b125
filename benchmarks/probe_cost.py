"""What the gate's probes cost where drafting never pays (batch 8, mbpp / mt-bench): a probe is a drafted round
between runs of plain rounds (back-off 1, 2, 4, … ≤ `speculative.MAX_PLAIN_RUN`); where nothing drafts it
verifies only the anchors (bucket B). Two measurements, one run:

1. Rounds timed long: a plain round and a bucket-B round with the hybrid's model forward and without, each as
   (time of lo + n rounds − time of lo rounds) / n over --rounds rounds (`round_costs.time_rounds`; the round-cost
   profile times 4 rounds: its ratios carry ±10–15 %), --repeats passes, the pass-by-pass ratio to the pass's
   plain round.
2. The whole loop at several back-off caps (0: every round after the first plain one is a probe; 16, the loop's;
   1000: ~7 probes in 96 rounds), `--draft_length auto` settings, against plain decoding, interleaved, paired per
   repeat, on the first --batch_size prompts of --dataset: what the probes cost inside the loop. The cap is a
   module constant read while tracing: JAX's caches are cleared between variants, and the run stops if two
   variants compiled to the same program.

    python benchmarks/probe_cost.py [--dataset mt-bench --batch_size 8 --gamma 15 --repeats 7 --rounds 40
                                     --caps 0,16,1000]

Writes JSON.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mt-bench")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--gamma", type=int, default=15)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--drafter", default="default+ngram")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=40, help="rounds per timing difference in part 1")
    ap.add_argument("--caps", default="0,16,1000", help="back-off caps of part 2 (0: every round after the "
                    "first plain one is a drafted round)")
    ap.add_argument("--output", default="benchmarks/results/probe_cost.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import dspark_jax.decoding.speculative as speculative
    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.decoding.autoregressive import generate
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.generation import encode_prompts, pad_batch
    from dspark_jax.round_costs import load_or_profile_round_costs, time_rounds
    from dspark_jax.sampling import SamplingParams
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    target = load_target()
    drafter = with_block_size(load_drafter(args.drafter, target, gamma=args.gamma), args.gamma)
    bs, n_new = args.batch_size, args.max_new_tokens
    prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path(args.dataset))[:bs]]
    tokens, lens = pad_batch(encode_prompts(target, prompts, n_new), target.config.pad_token_id, bs)
    width = int(tokens.shape[1])

    # 1. rounds timed long (bucket B only: anchors, no draft)
    t = time_rounds(target, drafter, bs, (bs,), prompt_len=width, max_new_tokens=n_new, repeats=args.repeats,
                    lo=4, hi=4 + args.rounds)
    names = ["with the model's forward", "model skipped"][:len(t.rounds)]
    part1 = dict(plain_ms=[x * 1e3 for x in t.plain])
    print(f"machine: {describe_machine()}; batch {bs}, prompt width {width}, {args.rounds} rounds per timing")
    print(f"plain round: median {statistics.median(t.plain) * 1e3:.1f} ms")
    for v, name in enumerate(names):
        ratios = [r / p for r, p in zip(t.rounds[v][0], t.plain)]
        part1[name] = dict(ms=[x * 1e3 for x in t.rounds[v][0]], ratio_to_plain=ratios)
        print(f"probe at bucket {bs} ({name}): median {statistics.median(t.rounds[v][0]) * 1e3:.1f} ms, "
              f"{statistics.median(ratios):.3f}x the pass's plain round [{min(ratios):.3f}, {max(ratios):.3f}]")

    # 2. the loop at several back-off caps against plain decoding (MAX_PLAIN_RUN is read while tracing)
    settings = load_or_profile_round_costs(target, drafter, bs, width, n_new).loop_settings()
    common = dict(prompts=jnp.asarray(tokens), prompt_lens=jnp.asarray(lens),
                  key=jax.random.split(jax.random.key(0), bs), params=SamplingParams.create(bs, 0.0, 0, 1.0))
    static = dict(max_new_tokens=n_new, stop_ids=target.stop_ids, pad_id=target.config.pad_token_id)
    exe = {"plain": generate.lower(state=target.state, graphdef=target.graphdef, **common, **static).compile()}
    call = {"plain": dict(state=target.state, **common)}
    spec_args = dict(common, target_state=target.state, drafter_state=drafter.state,
                     confidence_threshold=jnp.float32(0.0))
    default_cap = speculative.MAX_PLAIN_RUN
    caps = [int(c) for c in args.caps.split(",")]
    try:
        for cap in caps:
            speculative.MAX_PLAIN_RUN = cap
            jax.clear_caches()  # else the first variant's cached trace serves all (the cap is read while tracing)
            exe[cap] = speculative.speculative_generate.lower(
                **spec_args, target_graphdef=target.graphdef, drafter_graphdef=drafter.graphdef, **static,
                **settings).compile()
            call[cap] = spec_args
    finally:
        speculative.MAX_PLAIN_RUN = default_cap
        jax.clear_caches()
    texts = [exe[cap].as_text() for cap in caps]
    if len(set(texts)) != len(texts):
        raise SystemExit("the back-off cap variants compiled to the same program: the cap was not traced")
    outs = {k: jax.block_until_ready(exe[k](**call[k])) for k in exe}  # warm-up
    times = {k: [] for k in exe}
    for _ in range(args.repeats):
        for k in exe:
            t0 = time.perf_counter()
            jax.block_until_ready(exe[k](**call[k]))
            times[k].append(time.perf_counter() - t0)
    part2 = []
    for cap in caps:
        same = bool((np.asarray(outs[cap].tokens) == np.asarray(outs["plain"].tokens)).all())
        stats = outs[cap]
        paired = [a / b for a, b in zip(times[cap], times["plain"])]
        part2.append(dict(cap=cap, paired_ratios=paired, paired_median=statistics.median(paired), times=times[cap],
                          rounds=int(np.asarray(stats.rounds).max()), identical_to_plain=same))
        print(f"loop, back-off cap {cap:>4}: time / plain decoding {statistics.median(paired):.3f} "
              f"[{min(paired):.3f}, {max(paired):.3f}], {part2[-1]['rounds']} rounds, output = plain: {same}")
    write_result(args.output, dict(machine=describe_machine(), **vars(args), prompt_width=width,
                                   plain_decoding_times=times["plain"], rounds_timed_long=part1, by_cap=part2,
                                   settings={k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}))


if __name__ == "__main__":
    main()

"""Where a batch's speculative rounds go: per round of the jitted loop (`--draft_length auto`, T = 0), its kind,
verification bucket, the profile's price and the objective's expected progress against the realized one.

    python benchmarks/batch_trace.py [--datasets gsm8k --batch_size 8 --gamma 15 --drafter default+ngram]

The loop's statistics (`SpecOutput`: per request and round, the drafts verified, tokens committed and the
confidences the bucket was chosen from) hold everything the round's choice read at T = 0, so each round is
replayed afterwards: its rows (active anchors + verified drafts) give the smallest bucket holding them, priced
by the round-cost profile the loop ran with (with the model's forward and without: a hybrid's round may skip it,
which the statistics do not record, so both are shown), and its expected progress of the longest remaining
request (`draft_length.fluid_gain`) is set against the realized one (the drop of the longest remaining count).
A round whose requests all verify nothing and carry no confidence is a plain round (or a probe whose lookup
found nothing with the model skipped). Prints, per set: the rounds by kind and bucket, expected and realized
progress, and the profile's seconds for the rounds against plain decoding's steps (`plain` × steps) and the
measured seconds of both (prefill excluded: `speculative_start` and plain decoding's prefill timed apart).
Writes JSON with every round.
"""
from __future__ import annotations

import argparse
import collections
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="gsm8k")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--gamma", type=int, default=15)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--drafter", default="default+ngram")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each decoding (best kept)")
    ap.add_argument("--output", default="benchmarks/results/batch_trace.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.decoding.autoregressive import generate
    from dspark_jax.decoding.draft_length import expected_committed, fluid_gain
    from dspark_jax.decoding.speculative import speculative_generate
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.generation import encode_prompts, pad_batch
    from dspark_jax.round_costs import load_or_profile_round_costs
    from dspark_jax.sampling import SamplingParams
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    target = load_target()
    drafter = with_block_size(load_drafter(args.drafter, target, gamma=args.gamma), args.gamma)
    bs, n_new = args.batch_size, args.max_new_tokens

    def best_time(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    results = []
    for name in args.datasets.split(","):
        prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path(name))[:bs]]
        tokens, lens = pad_batch(encode_prompts(target, prompts, n_new), target.config.pad_token_id, bs)
        costs = load_or_profile_round_costs(target, drafter, bs, int(tokens.shape[1]), n_new)
        settings = costs.loop_settings()
        common = dict(prompts=jnp.asarray(tokens), prompt_lens=jnp.asarray(lens),
                      key=jax.random.split(jax.random.key(0), bs), params=SamplingParams.create(bs, 0.0, 0, 1.0))
        static = dict(max_new_tokens=n_new, stop_ids=target.stop_ids, pad_id=target.config.pad_token_id)
        def spec(**kw):  # the jitted functions themselves: the weights are arguments, not constants
            return speculative_generate(target.graphdef, target.state, drafter.graphdef, drafter.state,
                                        confidence_threshold=jnp.float32(0.0), **kw, **static, **settings)

        def plain(**kw):
            return generate(target.graphdef, target.state, **kw, **static)

        def prefill_only(**kw):
            return generate(target.graphdef, target.state, **kw, **dict(static, max_new_tokens=1))
        out = jax.block_until_ready(spec(**common))
        spec_s = best_time(lambda: jax.block_until_ready(spec(**common)))
        plain_s = best_time(lambda: jax.block_until_ready(plain(**common)))
        prefill_s = best_time(lambda: jax.block_until_ready(prefill_only(**common)))

        buckets = settings["verify_buckets"]
        with_model = dict(zip(buckets, settings["verify_costs"]))
        lookup = dict(zip(buckets, settings.get("lookup_costs") or settings["verify_costs"]))
        verified, committed = np.asarray(out.proposed), np.asarray(out.committed)
        conf = np.asarray(out.confidence)
        n_rounds = np.asarray(out.rounds)
        generated = np.ones(bs, int)
        rounds = []
        for r in range(int(n_rounds.max())):
            active = n_rounds > r
            remaining = n_new - generated
            v = np.where(active, verified[:, r], 0)
            kind = "plain" if not (v.any() or np.abs(conf[active, r]).sum() > 0) else "drafted"
            rows = int(active.sum() + v.sum())
            bucket = next((t for t in buckets if t >= rows), buckets[-1])
            expected = float(fluid_gain(jnp.asarray(conf[:, r]), jnp.asarray(v), jnp.asarray(active),
                                        jnp.asarray(remaining)))
            per_request = np.asarray(expected_committed(jnp.asarray(conf[:, r]), jnp.asarray(v), jnp.asarray(remaining)))
            generated = generated + np.where(active, committed[:, r], 0)
            longest_before = remaining[active].max()
            longest_after = (n_new - generated)[(n_rounds > r + 1)].max() if (n_rounds > r + 1).any() else 0
            rounds.append(dict(round=r, kind=kind, rows=rows, bucket=bucket, active=int(active.sum()),
                               verified=v.tolist(), committed=np.where(active, committed[:, r], 0).tolist(),
                               expected=expected, realized=int(longest_before - longest_after),
                               expected_committed=float(per_request[active].sum()),
                               cost_model=with_model[bucket] if kind == "drafted" else costs.plain,
                               cost_lookup=lookup[bucket] if kind == "drafted" else costs.plain))
        drafted = [x for x in rounds if x["kind"] == "drafted"]
        by_bucket = collections.Counter(x["bucket"] for x in drafted)
        predicted_model = sum(x["cost_model"] for x in rounds)
        predicted_lookup = sum(x["cost_lookup"] for x in rounds)
        plain_steps = int(np.asarray(out.num_tokens).max()) - 1  # plain decoding's steps after the prefill's token
        row = dict(dataset=name, rounds=len(rounds), drafted_rounds=len(drafted),
                   drafted_by_bucket=dict(sorted(by_bucket.items())),
                   expected_progress_drafted=sum(x["expected"] for x in drafted),
                   realized_progress_drafted=sum(x["realized"] for x in drafted),
                   expected_committed_drafted=sum(x["expected_committed"] for x in drafted),
                   committed_drafted=int(sum(sum(x["committed"]) for x in drafted)),
                   profile_rounds_s=[predicted_lookup, predicted_model], profile_plain_s=plain_steps * costs.plain,
                   measured_loop_s=spec_s - prefill_s, measured_plain_s=plain_s - prefill_s, prefill_s=prefill_s,
                   settings={k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
                   round_trace=rounds)
        results.append(row)
        print(f"{name}: {len(rounds)} rounds, {len(drafted)} drafted (by bucket {dict(sorted(by_bucket.items()))}); "
              f"drafted rounds' progress of the longest request: expected {row['expected_progress_drafted']:.1f}, "
              f"realized {row['realized_progress_drafted']}; tokens committed: expected "
              f"{row['expected_committed_drafted']:.0f}, realized {row['committed_drafted']}")
        print(f"  profile: rounds {predicted_lookup:.3f}..{predicted_model:.3f} s (without / with the model's forward) "
              f"vs plain {row['profile_plain_s']:.3f} s ({plain_steps} steps × {costs.plain * 1e3:.1f} ms)")
        print(f"  measured (prefill {prefill_s:.3f} s excluded): loop {row['measured_loop_s']:.3f} s, plain decoding "
              f"{row['measured_plain_s']:.3f} s, ratio {row['measured_loop_s'] / row['measured_plain_s']:.3f}")
        for x in drafted:
            print(f"    round {x['round']:3d} bucket {x['bucket']:3d} rows {x['rows']:3d} expected {x['expected']:.2f} "
                  f"realized {x['realized']} verified {x['verified']} committed {x['committed']}")
        write_result(args.output, dict(machine=describe_machine(), **vars(args), results=results))


if __name__ == "__main__":
    main()

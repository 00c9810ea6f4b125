"""Regeneration throughput of the embedded target (the data pipeline's cost): greedy vs sampled at T 0.7 /
top-k 20 / top-p 0.8, and the sampled run again with the previous sampler (a Gumbel draw over all 262,144
logits of every row) — side by side in one run, same prompts, batch and length.

    python benchmarks/regeneration.py [--batch_size 16] [--max_new_tokens 64] [--repeats 2]

Prints a table and writes benchmarks/results/regeneration.json.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.data import training_prompts
from dspark_jax.decoding import autoregressive
from dspark_jax.sampling import FilterMode, SamplingParams, categorical, fast_argmax, filter_logits, sample
from dspark_jax.generation import pad_batch
from dspark_jax.target import load_target
from dspark_jax.training.responses import RegenConfig, prompt_ids
from dspark_jax.utils.machine import describe_machine
from dspark_jax.utils.results import write_result


@functools.partial(jax.jit, static_argnames='mode')
def full_row_sample(key, logits, params, mode):
    """The sampler before the top-k candidate draw: Gumbel noise for every logit of every row."""
    drawn = categorical(key, filter_logits(logits, params, mode))
    return jnp.where(params.temperature == 0, fast_argmax(logits), drawn).astype(jnp.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--output", default="benchmarks/results/regeneration.json")
    args = ap.parse_args()
    target = load_target()
    cfg = RegenConfig(max_prompt_tokens=256)
    prompts = [prompt_ids(target, p, cfg) for p in training_prompts()[:args.batch_size]]
    tokens, lens = pad_batch(prompts, target.config.pad_token_id, args.batch_size)
    settings = [("greedy", 0.0, 0, 1.0, sample), ("T 0.7, top-k 20, top-p 0.8", 0.7, 20, 0.8, sample),
                ("same, previous full-row sampler", 0.7, 20, 0.8, full_row_sample)]
    rows = []
    print(f"machine: {describe_machine()}; batch {args.batch_size}, {args.max_new_tokens} new tokens")
    for name, t, k, p, sampler in settings:
        params = SamplingParams.create(args.batch_size, t, k, p)
        mode = FilterMode.for_run(t, k, p)
        autoregressive.sample = sampler  # the loop reads the module global when it is traced
        fn = jax.jit(functools.partial(autoregressive.generate.__wrapped__, target.graphdef,
                                       max_new_tokens=args.max_new_tokens, stop_ids=(), mode=mode,
                                       pad_id=target.config.pad_token_id))
        run = lambda: fn(target.state, jnp.asarray(tokens), jnp.asarray(lens), jax.random.key(0), params)  # noqa: E731
        jax.block_until_ready(run())
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - t0)
        tps = args.batch_size * args.max_new_tokens / float(np.median(times))
        rows.append(dict(setting=name, tokens_per_s=tps))
        print(f"{name:34s} {tps:7.1f} tokens/s", flush=True)
    autoregressive.sample = sample
    for r in rows:
        r["vs_greedy"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    print("\n| setting | tokens/s | vs greedy |\n|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['tokens_per_s']:.1f} | {r['vs_greedy']:.2f}x |")
    write_result(args.output, dict(machine=describe_machine(), batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, rows=rows))


if __name__ == "__main__":
    main()

"""What the shipped drafter's propose costs by batch size and block length (T = 0): the backbone alone, with the
draft head, and the whole propose (Markov head, sampling, confidences) — why the hybrid's model drafts a shorter
block at batch > 1 (`HybridConfig.model_draft_length`).

    python benchmarks/propose_cost.py [--batch_sizes 1,8] [--gammas 1,2,4,8,15] [--repeats 15]
                                      [--output benchmarks/results/propose_cost.json]

Median of --repeats jitted calls after one warm-up call, on a 64-token random prompt with a 256-row drafter cache.
Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.decoding.autoregressive import prefill
from dspark_jax.decoding.speculative import draft_head
from dspark_jax.decoding.verification import concat_taps
from dspark_jax.drafters.factory import load_drafter, with_block_size
from dspark_jax.sampling import FilterMode, SamplingParams
from dspark_jax.target import load_target
from dspark_jax.utils.machine import describe_machine
from dspark_jax.utils.results import write_result
from dspark_jax.utils.timing import median_seconds

PROMPT_LEN, CACHE_LEN = 64, 256
PARTS = ("backbone", "with_head", "propose")


@functools.partial(jax.jit, static_argnames=("tg", "dg"))
def _start(tg, ts, dg, ds, prompts, lens):
    target, drafter = nnx.merge(tg, ts), nnx.merge(dg, ds)
    logits, out = prefill(target, prompts, lens, CACHE_LEN, tap_layers=drafter.config.target_layer_ids)
    state = drafter.prefill(target, drafter.init_state(prompts.shape[0], CACHE_LEN), concat_taps(out.taps),
                            prompts, lens)
    return state, jnp.argmax(logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("tg", "dg", "part"))
def _run(tg, ts, dg, ds, state, anchor, start, head, *, part: str):
    target, drafter = nnx.merge(tg, ts), nnx.merge(dg, ds)
    if part == "backbone":
        return drafter.backbone(target, anchor, start, state)
    if part == "with_head":
        return drafter.base_logits(drafter.backbone(target, anchor, start, state), head)
    p = drafter.propose(target, state, anchor, start, jax.random.key(0),
                        SamplingParams.create(anchor.shape[0], 0.0), FilterMode(), head)
    return p.tokens, p.confidence


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch_sizes", default="1,8")
    ap.add_argument("--gammas", default="1,2,4,8,15")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--output", default="benchmarks/results/propose_cost.json")
    args = ap.parse_args()
    target = load_target(None)
    shipped = load_drafter("default", target)
    print(f"machine: {describe_machine()}; shipped drafter (block {shipped.config.block_size}), T = 0")
    print(f"{'batch':>5} {'gamma':>5} {'backbone ms':>12} {'+ draft head ms':>16} {'propose ms':>11}")
    rows = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = jnp.asarray(np.random.default_rng(0).integers(10, 5000, (b, PROMPT_LEN)), jnp.int32)
        lens = jnp.full((b,), PROMPT_LEN, jnp.int32)
        for g in [int(x) for x in args.gammas.split(",")]:
            d = with_block_size(shipped, g)
            tg, ts, dg, ds = target.graphdef, target.state, d.graphdef, d.state
            head = draft_head(tg, ts, dg, ds)
            state, anchor = _start(tg, ts, dg, ds, prompts, lens)
            ms = {part: 1e3 * median_seconds(lambda part=part: _run(tg, ts, dg, ds, state, anchor, lens, head,
                                                                   part=part), args.repeats) for part in PARTS}
            rows.append({"batch": b, "gamma": g, **{f"{part}_ms": ms[part] for part in PARTS}})
            print(f"{b:>5} {g:>5} {ms['backbone']:>12.1f} {ms['with_head']:>16.1f} {ms['propose']:>11.1f}", flush=True)
    write_result(args.output, {"machine": describe_machine(), "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()

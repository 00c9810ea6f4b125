"""The shipped drafter's propose at batch 1 (T = 0) with its draft head computed three ways, interleaved in one
process: the einsum it ran before session 47, the float32 rows through `models.output_head.tied_logits` (on CPU the
fused loop, 15 rows padded to 16; sessions 47–50) and the rows of the target's int8 blocks through the `q8_ffi`
kernel (`drafters.base.draft_head_rows`, where the kernel is built; since session 51). Same tokens, confidences
within 1e-5, and the time of each.

    python benchmarks/propose_head.py [--pairs 60] [--output benchmarks/results/propose_head.json]

The einsum variant is traced with `drafters.dspark`'s `head_logits` name bound to the einsum (a measurement
device: the module keeps one path). Prints medians, minima and the paired ratios against the einsum; writes JSON.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dspark_jax.drafters.dspark as dspark_module
from dspark_jax.decoding.autoregressive import prefill
from dspark_jax.decoding.speculative import draft_head
from dspark_jax.decoding.verification import concat_taps
from dspark_jax.drafters.factory import load_drafter
from dspark_jax.models.output_head import HeadRows
from dspark_jax.sampling import FilterMode, SamplingParams
from dspark_jax.target import load_target
from dspark_jax.utils.machine import describe_machine
from dspark_jax.utils.results import write_result

PROMPT_LEN, CACHE_LEN = 64, 256


def _einsum(hidden, head):
    return jnp.einsum("...d,nd->...n", hidden, head, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("tg", "dg"))
def _start(tg, ts, dg, ds, prompts, lens):
    target, drafter = nnx.merge(tg, ts), nnx.merge(dg, ds)
    logits, out = prefill(target, prompts, lens, CACHE_LEN, tap_layers=drafter.config.target_layer_ids)
    state = drafter.prefill(target, drafter.init_state(1, CACHE_LEN), concat_taps(out.taps), prompts, lens)
    return state, jnp.argmax(logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("tg", "dg", "variant"))
def _propose(tg, ts, dg, ds, state, anchor, start, head, *, variant: str):
    target, drafter = nnx.merge(tg, ts), nnx.merge(dg, ds)
    kept = dspark_module.head_logits
    if variant == "einsum":
        dspark_module.head_logits = lambda hidden, rows: _einsum(hidden, rows.table)
    try:
        p = drafter.propose(target, state, anchor, start, jax.random.key(0), SamplingParams.create(1, 0.0),
                            FilterMode(), head if variant == "int8" else HeadRows(head.table))
    finally:
        dspark_module.head_logits = kept
    return p.tokens, p.confidence


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--output", default="benchmarks/results/propose_head.json")
    args = ap.parse_args()
    target = load_target(None)
    drafter = load_drafter("default", target)
    tg, ts, dg, ds = target.graphdef, target.state, drafter.graphdef, drafter.state
    head = draft_head(tg, ts, dg, ds)
    prompts = jnp.asarray(np.random.default_rng(0).integers(10, 5000, (1, PROMPT_LEN)), jnp.int32)
    lens = jnp.asarray([PROMPT_LEN], jnp.int32)
    state, anchor = _start(tg, ts, dg, ds, prompts, lens)
    variants = ("einsum", "tied_logits") + (("int8",) if head.q8_values is not None else ())
    outs = [jax.block_until_ready(_propose(tg, ts, dg, ds, state, anchor, lens, head, variant=v)) for v in variants]
    for v, out in zip(variants[1:], outs[1:]):
        if not (np.array_equal(outs[0][0], out[0]) and np.allclose(outs[0][1], out[1], atol=1e-5)):
            raise AssertionError(f"the {v} head proposed differently from the einsum")
    times = {v: [] for v in variants}
    for _ in range(args.pairs):
        for v in variants:
            t0 = time.perf_counter()
            jax.block_until_ready(_propose(tg, ts, dg, ds, state, anchor, lens, head, variant=v))
            times[v].append(time.perf_counter() - t0)
    ratios = {v: statistics.median(b / a for a, b in zip(times["einsum"], times[v])) for v in variants[1:]}
    print(f"machine: {describe_machine()}; shipped drafter, batch 1, γ {drafter.config.block_size}, "
          f"{head.table.shape[0]}-row draft head")
    for v in variants:
        print(f"propose, draft head by {v:11s}: median {1e3 * statistics.median(times[v]):6.2f} ms, "
              f"min {1e3 * min(times[v]):6.2f} ms")
    for v, r in ratios.items():
        print(f"paired ratio {v} / einsum: median {r:.3f} over {args.pairs} pairs")
    write_result(args.output, {"machine": describe_machine(), "pairs": args.pairs, "paired_ratios": ratios,
                               **{f"{v}_ms": [1e3 * t for t in times[v]] for v in variants}})


if __name__ == "__main__":
    main()

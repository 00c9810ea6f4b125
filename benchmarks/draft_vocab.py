"""Drafting time per round vs draft vocabulary size, next to the target's verification time, on the
embedded Gemma 3 270M (262k vocabulary).

    python benchmarks/draft_vocab.py [--gamma 7] [--batch_size 1] [--sizes full,65536,32768,16384,8192]

Times one jitted DSpark proposal (backbone + Markov sampling over the draft vocabulary) and one
verification forward of γ+1 tokens with a 128-token context; median of --repeats runs after warm-up.
Coverage = share of the evaluation prompts' tokens inside the draft vocabulary (picked from the training
prompts only): a proxy for the acceptance ceiling until trained drafters measure it on responses.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.utils.timing import median_seconds


@functools.partial(jax.jit, static_argnames=("tg", "dg"))
def _propose(tg, ts, dg, ds, drafter_state, head, anchor, start, key, params):
    from dspark_jax.sampling import FilterMode
    target, drafter = nnx.merge(tg, ts), nnx.merge(dg, ds)
    return drafter.propose(target, drafter_state, anchor, start, key, params, FilterMode(), head)


@functools.partial(jax.jit, static_argnames=("tg",))
def _verify(tg, ts, cache, tokens, start):
    target = nnx.merge(tg, ts)
    pos = start[:, None] + jnp.arange(tokens.shape[1])[None]
    return target.logits(target(tokens, pos, cache, start).hidden)


def main():
    from dspark_jax.utils.results import write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--num_layers", type=int, default=5)
    ap.add_argument("--sizes", default="full,65536,32768,16384,8192")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--output", default="benchmarks/results/draft_vocab.json")
    args = ap.parse_args()

    from dspark_jax.sampling import SamplingParams
    from dspark_jax.drafters.factory import random_drafter
    from dspark_jax.models.kv_cache import init_cache
    from dspark_jax.target import load_target
    from dspark_jax.utils.machine import describe_machine

    target = load_target(None)
    b, ctx, g = args.batch_size, 128, args.gamma
    key = jax.random.key(0)
    params = SamplingParams.create(b, 1.0)
    anchor, start = jnp.full((b,), 100, jnp.int32), jnp.full((b,), ctx, jnp.int32)
    cache = init_cache(target.config, b, ctx + g + 1)
    verify_s = median_seconds(lambda: _verify(target.graphdef, target.state, cache,
                                           jnp.ones((b, g + 1), jnp.int32), start), args.repeats)
    from dspark_jax.data import EVAL_ONLY, eval_dataset_path, read_first_turns
    eval_tokens = jnp.asarray([t for name in EVAL_ONLY for text in read_first_turns(eval_dataset_path(name))
                               for t in target.tokenizer.encode(text, add_bos=False)], jnp.int32)
    rows = []
    print(f"verification of {g + 1} tokens: {verify_s * 1e3:.1f} ms")
    for size in args.sizes.split(","):
        n = None if size == "full" else int(size)
        d = random_drafter(target, "dspark", gamma=g, num_layers=args.num_layers, draft_vocab_size=n)
        drafter = nnx.merge(d.graphdef, d.state)
        feats = jax.random.normal(key, (b, ctx, len(d.config.target_layer_ids) * target.config.hidden_size))
        drafter_state = drafter.write_context(drafter.init_state(b, ctx + g + 1), feats, jnp.zeros((b,), jnp.int32))
        head = jax.jit(drafter.head_matrix)(target.model)
        s = median_seconds(lambda: _propose(target.graphdef, target.state, d.graphdef, d.state, drafter_state, head, anchor,
                                         start, key, params), args.repeats)
        ids = jnp.asarray(drafter.draft_to_target[...])
        cover = 1.0 if n is None else float(jnp.isin(eval_tokens, ids).mean())
        rows.append(dict(draft_vocab=n or target.config.vocab_size, draft_ms=s * 1e3, verify_ms=verify_s * 1e3,
                         draft_over_verify=s / verify_s, eval_token_coverage=cover))
        print(f"draft vocab {n or target.config.vocab_size:>7}: draft {s * 1e3:7.1f} ms "
              f"({s / verify_s:.2f}x verification), covers {cover:.1%} of evaluation-prompt tokens", flush=True)
    full = next((r for r in rows if r["draft_vocab"] == target.config.vocab_size), None)
    if full:
        for r in rows:
            r["speedup_vs_full"] = full["draft_ms"] / r["draft_ms"]
    result = dict(machine=describe_machine(), model=target.config.name, gamma=g, batch_size=b,
                  draft_layers=args.num_layers, context=ctx, rows=rows)
    write_result(args.output, result)


if __name__ == "__main__":
    main()

"""The target's probability mass inside a drafter's draft vocabulary, at the teacher-forced block slots of
held-out feature caches (the slots `dspark eval --heldout_only` scores).

    python benchmarks/draft_vocab_mass.py --heldout_dirs runs/heldout,runs/heldout_t1 --drafters default \
        [--output benchmarks/results/draft_vocab_mass.json]

A draft token outside the draft vocabulary is never proposed, so at temperature 1 a slot's acceptance
1 − TV(p_d, p_t) is at most the target's mass inside it: the mean mass is the draft vocabulary's ceiling on
per-slot acceptance (c* of spec §1.7 / §2.6: 1 − TV). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnames=("graphdef", "target_graphdef", "num_anchors"))
def _mass_inside(graphdef, state, target_graphdef, target_state, batch, key, *, num_anchors: int):
    """[B, K, G] target mass inside the draft vocabulary, and the slots' eval mask."""
    from dspark_jax.training.forward import block_outputs, target_block_logits
    drafter, target = nnx.merge(graphdef, state), nnx.merge(target_graphdef, target_state)
    blocks, _, _, _ = block_outputs(drafter, target, batch, key, num_anchors)
    t_logits, lse = target_block_logits(drafter, target, batch, blocks)
    return jnp.exp(jax.nn.logsumexp(t_logits, axis=-1) - lse), blocks.eval_mask


def mass_inside(drafter, target, heldout_dir: str, num_anchors: int = 64) -> np.ndarray:
    """Target mass inside `drafter`'s draft vocabulary at every supervised slot of the cache (the blocks of
    `training.heldout.cache_quality`: same anchors, same key)."""
    from dspark_jax.training.forward import to_batch
    from dspark_jax.training.target_cache import TargetCache
    cache = TargetCache.open(Path(heldout_dir) / "cache", target_config=target.config,
                             layer_ids=drafter.config.target_layer_ids)
    out = []
    for i, batch in enumerate(cache.batches(4, 512, shuffle=False)):
        inside, mask = jax.device_get(_mass_inside(
            drafter.graphdef, drafter.state, target.graphdef, target.state, to_batch(batch, jnp.float32),
            jax.random.fold_in(jax.random.key(0), i), num_anchors=num_anchors))
        out.append(inside[mask])
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heldout_dirs", required=True, help="comma-separated `prepare-data --heldout` dirs")
    parser.add_argument("--drafters", default="default", help="comma-separated drafter specs (trained drafters)")
    parser.add_argument("--output", default="benchmarks/results/draft_vocab_mass.json")
    args = parser.parse_args()
    from dspark_jax.drafters.factory import load_drafter
    from dspark_jax.target import load_target
    target = load_target()
    rows = []
    print(f"{'drafter':<28} {'held-out':<22} {'draft vocab':>11} {'slots':>6} {'mean':>7} {'p10':>7} {'p50':>7}")
    for spec in args.drafters.split(","):
        drafter = load_drafter(spec, target)
        for heldout in args.heldout_dirs.split(","):
            m = mass_inside(drafter, target, heldout)
            row = dict(drafter=spec, heldout_dir=heldout, draft_vocab_size=drafter.config.draft_vocab_size,
                       slots=int(m.size), mean=float(m.mean()), p10=float(np.quantile(m, 0.1)),
                       p50=float(np.quantile(m, 0.5)))
            rows.append(row)
            print(f"{spec:<28} {heldout:<22} {row['draft_vocab_size']:>11} {row['slots']:>6} {row['mean']:>7.4f} "
                  f"{row['p10']:>7.4f} {row['p50']:>7.4f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(dict(rows=rows), indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

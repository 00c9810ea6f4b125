"""Can a drafter learn to copy? Tiny drafters trained on sequences that repeat random n-grams (the target: a
small random Gemma 3, d 64), scored by teacher-forced slot accuracy on held-out loops — the paper's drafter
(1..3 layers) against the drafter with lookup inputs, same data, steps and optimiser.

    python benchmarks/copy_learning.py [--steps 1500 --gamma 4 --layers 1,2,3]

Prints a table and writes benchmarks/results/copy_learning.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--layers", default="1,2,3", help="draft layers of the paper's drafter")
    ap.add_argument("--learning_rate", type=float, default=3e-3)
    ap.add_argument("--output", default="benchmarks/results/copy_learning.json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import jax.numpy as jnp
    from flax import nnx

    from dspark_jax.testing.tiny_configs import tiny_gemma3
    from dspark_jax.models.transformer import Transformer
    from dspark_jax.target import Target
    from dspark_jax.training.heldout import teacher_forced_quality
    from dspark_jax.training.cache_builder import build_target_cache
    from dspark_jax.training.target_cache import TargetCache
    from dspark_jax.training.forward import to_batch
    from dspark_jax.training.trainer import TrainConfig, Trainer
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result
    from test_copy_learning import TAPS, loops
    from dspark_jax.testing.tiny_target import CharTokenizer

    cfg = dataclasses.replace(tiny_gemma3(num_layers=3), hidden_size=64, head_dim=32, num_heads=2, num_kv_heads=1,
                              intermediate_size=128, bos_token_id=2, eos_token_ids=(1,))
    target = Target(cfg, *nnx.split(Transformer(cfg, rngs=nnx.Rngs(0))), CharTokenizer(), "tiny-64")
    runs = [(f"paper, {n} layer{'s' * (n > 1)}", n, 0) for n in map(int, args.layers.split(","))]
    runs.append(("lookup inputs, 1 layer", 1, 3))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = TargetCache.open(build_target_cache(target, loops(512, 0), root / "train", TAPS, dtype="float32",
                                                    batch_size=64, progress=False), layer_ids=TAPS)
        held = TargetCache.open(build_target_cache(target, loops(32, 1), root / "held", TAPS, dtype="float32",
                                                   batch_size=32, progress=False), layer_ids=TAPS)
        print(f"machine: {describe_machine()}; {args.steps} steps, gamma {args.gamma}")
        for name, layers, lookup in runs:
            tc = TrainConfig(algorithm="dspark", gamma=args.gamma, num_layers=layers, markov_rank=16,
                             draft_vocab_size=None, target_layer_ids=TAPS, learning_rate=args.learning_rate,
                             warmup_fraction=0.05, epochs=10 ** 4, max_steps=args.steps, batch_size=8, num_anchors=16,
                             max_len=64, seed=0, log_every=100, checkpoint_every=10 ** 6,
                             loss_weights=(1.0, 0.0, 0.0), lookup_inputs=lookup)
            t0 = time.perf_counter()
            drafter = Trainer(target, train, tc, root / name.replace(" ", "_")).run(progress=False)
            q = teacher_forced_quality(drafter, target, (to_batch(b, jnp.float32) for b in
                                                         held.batches(8, 64, shuffle=False)), num_anchors=32)
            rows.append(dict(drafter=name, layers=layers, lookup_inputs=lookup, slot_accuracy=q.slot_accuracy,
                             greedy_tau=q.greedy_tau, seconds=time.perf_counter() - t0))
            print(f"{name:<24} slot accuracy {' '.join(f'{a:.2f}' for a in q.slot_accuracy)}  "
                  f"greedy tau {q.greedy_tau:.2f}", flush=True)
    print("\n| drafter | slot accuracy (slots 1..γ) | greedy τ (max γ+1) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['drafter']} | {' / '.join(f'{a:.2f}' for a in r['slot_accuracy'])} | {r['greedy_tau']:.2f} |")
    write_result(args.output, dict(machine=describe_machine(), **vars(args), rows=rows))


if __name__ == "__main__":
    main()

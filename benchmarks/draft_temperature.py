"""Teacher-forced T = 1 acceptance when the drafter samples from its logits divided by a draft temperature t_d
(any draft distribution keeps verification lossless): probabilistic τ per t_d on a held-out cache.

    python benchmarks/draft_temperature.py runs/heldout5_t1 "shipped=default" 0.8,1.0,1.2

Arguments: a held-out cache directory (`dspark prepare-data --heldout N --temperature 1 ...`), NAME=DRAFTER,...
(`dspark eval --drafters`), comma list of t_d. Prints one line per drafter and t_d.
"""
import sys

import jax

from dspark_jax.cli.eval import load_drafters
from dspark_jax.target import load_target
from dspark_jax.training import heldout

_block_outputs = heldout.block_outputs
_SCALE = {"t": 1.0}


def _scaled(*args, **kwargs):
    blocks, logits, conf, hidden = _block_outputs(*args, **kwargs)
    return blocks, logits / _SCALE["t"], conf, hidden


def main():
    cache_dir, drafters, temps = sys.argv[1], sys.argv[2], [float(x) for x in sys.argv[3].split(",")]
    heldout.block_outputs = _scaled
    target = load_target(None)
    for label, drafter in load_drafters(target, [tuple(s.split("=", 1)) for s in drafters.split(",")], None, None, 0):
        for t in temps:
            _SCALE["t"] = t
            jax.clear_caches()  # the jitted scorer traced the previous t_d
            q = heldout.cache_quality(drafter, target, cache_dir)
            print(f"{label} t_d={t}: probabilistic τ {q.probabilistic_tau:.4f}, greedy τ {q.greedy_tau:.3f}", flush=True)


if __name__ == "__main__":
    main()

"""Held-out drafter quality without a decoding loop: teacher-forced blocks over cached target outputs.

For anchors inside the responses of a target cache (the target's own outputs for held-out prompts), the
drafter runs its training-time forward (`training.forward.block_outputs`: context strictly before the anchor,
Markov head fed the true previous tokens) and is scored per block slot k:

- slot accuracy acc_k: P(argmax draft token = the response token) over supervised slots;
- greedy τ: mean over blocks of 1 + Σ_k Π_{i≤k} [slot i correct] — the accept length of a full-γ round
  at temperature 0 anchored there (with every earlier slot right, teacher forcing feeds the Markov head
  exactly the tokens the drafter would have drafted, so this is the round's outcome, not an approximation);
- probabilistic τ (caches with target features): 1 + Σ_k Π_{i≤k} (1 − TV(p_d,i, p_t,i)), the temperature-1
  expected accept length of spec §2.7;
- draft-vocabulary mass (caches with target features): the mean over supervised slots of the target's
  probability inside the draft vocabulary — a drafter never proposes a token outside it, so this bounds a
  slot's temperature-1 acceptance 1 − TV from above (1 for a full-vocabulary drafter).

Eagle3 drafters are scored on the same anchors by their training-time-test forward with γ steps
(`training.eagle3_forward`: query row a − 1, step k fed the true token x_{a+k}, its own hidden states): with
every earlier slot right that is again exactly the round's greedy outcome.

Seconds for a few thousand blocks on a CPU, so training can be steered by held-out quality.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.training.eagle3_forward import eagle3_ttt_outputs, ttt_query_rows
from dspark_jax.training.forward import TrainBatch, block_outputs, draft_labels, target_block_logits, to_batch
from dspark_jax.training.losses import dspark_slot_terms


@dataclasses.dataclass(frozen=True)
class TeacherForcedQuality:
    """slot_accuracy [G]; greedy_tau, probabilistic_tau and draft_vocab_mass (both None without target
    features) as in the module docstring; num_blocks: blocks scored."""
    slot_accuracy: tuple[float, ...]
    greedy_tau: float
    probabilistic_tau: float | None
    num_blocks: int
    draft_vocab_mass: float | None = None

    def as_dict(self, prefix: str = "heldout/") -> dict[str, float]:
        out = {f"{prefix}greedy_tau": self.greedy_tau, f"{prefix}num_blocks": float(self.num_blocks)}
        if self.probabilistic_tau is not None:
            out[f"{prefix}probabilistic_tau"] = self.probabilistic_tau
        if self.draft_vocab_mass is not None:
            out[f"{prefix}draft_vocab_mass"] = self.draft_vocab_mass
        out.update({f"{prefix}slot_accuracy@{k}": a for k, a in enumerate(self.slot_accuracy)})
        return out


@functools.partial(jax.jit, static_argnames=("graphdef", "target_graphdef", "num_anchors", "with_target"))
def _block_counts(graphdef, state, target_graphdef, target_state, batch: TrainBatch, key, *, num_anchors: int,
                  with_target: bool):
    """Per-batch sums: correct [G], valid [G], greedy τ sum, probabilistic τ sum, draft-vocabulary mass sum over
    supervised slots, blocks."""
    drafter, target = nnx.merge(graphdef, state), nnx.merge(target_graphdef, target_state)
    blocks, logits, _, _ = block_outputs(drafter, target, batch, key, num_anchors)
    mask = blocks.eval_mask
    predicted = jnp.take(drafter.draft_to_target[...], jnp.argmax(logits, axis=-1), axis=0)
    accept = inside = None
    if with_target:
        t_logits, lse = target_block_logits(drafter, target, batch, blocks)
        accept = dspark_slot_terms(logits, t_logits, None if drafter.full_vocab else lse,
                                   draft_labels(drafter, blocks.labels), mask).accept
        inside = 1.0 if drafter.full_vocab else jnp.exp(jax.nn.logsumexp(t_logits, axis=-1) - lse)
    return _slot_sums((predicted == blocks.labels) & mask, mask, accept, inside)


def _slot_sums(correct: jax.Array, mask: jax.Array, accept: jax.Array | None, inside) -> tuple:
    """The per-batch sums of `_block_counts` from per-slot [..., G] arrays: correct and mask (bool, mask a
    supervised prefix), accept (1 − TV) and inside (target mass in the draft vocabulary), None without targets."""
    first = mask[..., 0].astype(jnp.float32)
    greedy = jnp.sum(first * (1.0 + jnp.cumprod(correct, axis=-1).sum(-1)))
    prob = mass = jnp.float32(0.0)
    if accept is not None:
        prob = jnp.sum(first * (1.0 + jnp.cumprod(jnp.where(mask, accept, 0.0), axis=-1).sum(-1)))
        mass = jnp.sum(jnp.where(mask, inside, 0.0))
    lead = tuple(range(mask.ndim - 1))
    return correct.sum(lead), mask.sum(lead), greedy, prob, mass, first.sum()


@functools.partial(jax.jit, static_argnames=("graphdef", "target_graphdef", "num_anchors", "with_target"))
def _ttt_counts(graphdef, state, target_graphdef, target_state, batch: TrainBatch, key, *, num_anchors: int,
                with_target: bool):
    """`_block_counts` for an Eagle3 drafter: its γ-step TTT forward at the same anchors (query = anchor − 1;
    an anchor 0, possible only where the prompt's first token is supervised, has no features before it and is
    dropped). Needs target features (`last_hidden`): the TTT forward always reads the target's rows."""
    drafter, target = nnx.merge(graphdef, state), nnx.merge(target_graphdef, target_state)
    g = drafter.config.block_size
    rows, valid = ttt_query_rows(key, batch.loss_mask, num_anchors)
    log_probs, target_probs, masks = eagle3_ttt_outputs(drafter, target, batch, g, (rows, valid))
    mask = jnp.cumprod(jnp.moveaxis(masks, 0, -1), axis=-1).astype(bool)        # [B, A, G]: a supervised prefix
    labels = jnp.stack([jnp.take_along_axis(batch.tokens, jnp.minimum(rows + k + 2, batch.tokens.shape[1] - 1),
                                            axis=1) for k in range(g)], axis=-1)
    predicted = jnp.take(drafter.draft_to_target[...], jnp.argmax(jnp.moveaxis(log_probs, 0, -2), axis=-1), axis=0)
    accept = inside = None
    if with_target:
        accept = jnp.moveaxis(jnp.sum(jnp.minimum(jnp.exp(log_probs), target_probs), axis=-1), 0, -1)  # [B, A, G]
        inside = jnp.moveaxis(target_probs.sum(-1), 0, -1)
    return _slot_sums((predicted == labels) & mask, mask, accept, inside)


_COUNTS = {"dspark": _block_counts, "dflash": _block_counts, "eagle3": _ttt_counts}
SCORED_ALGORITHMS = tuple(_COUNTS)  # the drafter algorithms `teacher_forced_quality` scores


def teacher_forced_quality(drafter, target, batches: Iterable[TrainBatch], *, num_anchors: int = 64,
                           seed: int = 0) -> TeacherForcedQuality:
    """Scores `drafter` (a `drafters.factory.Drafter`: DSpark, DFlash or Eagle3) on padded batches of cached
    sequences (`training.trainer.to_batch` of `TargetCache.batches`). Up to `num_anchors` anchors per
    sequence, drawn with a fixed key (the same anchors every call, and for every algorithm). Raises ValueError
    for another algorithm and when no block is supervised."""
    counts = _COUNTS.get(drafter.config.algorithm)
    if counts is None:
        raise ValueError(f"teacher-forced quality needs a DSpark, DFlash or Eagle3 drafter, got "
                         f"{drafter.config.algorithm}")
    g = drafter.config.block_size
    correct, valid = np.zeros(g), np.zeros(g)
    greedy = prob = mass = blocks = 0.0
    with_target = None
    for i, batch in enumerate(batches):
        with_target = batch.last_hidden is not None
        if counts is _ttt_counts and not with_target:
            raise ValueError("an Eagle3 drafter's teacher-forced quality needs target features (last_hidden) in "
                             "the held-out batches")
        c, v, gt, pt, mt, n = jax.device_get(counts(
            drafter.graphdef, drafter.state, target.graphdef, target.state, batch,
            jax.random.fold_in(jax.random.key(seed), i), num_anchors=num_anchors, with_target=with_target))
        correct += c
        valid += v
        greedy, prob, mass, blocks = greedy + float(gt), prob + float(pt), mass + float(mt), blocks + float(n)
    if not blocks:
        raise ValueError("no supervised block in the held-out data (empty or too short responses)")
    accuracy = tuple(float(x) for x in correct / np.maximum(valid, 1))
    return TeacherForcedQuality(slot_accuracy=accuracy, greedy_tau=greedy / blocks,
                                probabilistic_tau=prob / blocks if with_target else None, num_blocks=int(blocks),
                                draft_vocab_mass=mass / valid.sum() if with_target else None)


def cache_quality(drafter, target, cache_dir: str | Path, *, batch_size: int = 4, max_len: int = 512,
                  num_anchors: int = 64) -> TeacherForcedQuality:
    """`teacher_forced_quality` of `drafter` on a held-out feature cache (`dspark prepare-data --heldout N
    --output_dir D`: pass D), read at the drafter's tapped layers in float32. Raises FileNotFoundError without
    D/cache, ValueError when the cache is of another target or lacks the drafter's layers."""
    from dspark_jax.training.target_cache import TargetCache
    path = Path(cache_dir) / "cache"
    if not path.is_dir():
        raise FileNotFoundError(f"{cache_dir} has no cache/: run `dspark prepare-data --heldout N --output_dir "
                                f"{cache_dir}` with the drafter's --layer_ids first")
    cache = TargetCache.open(path, target_config=target.config, layer_ids=drafter.config.target_layer_ids)
    batches = (to_batch(b, jnp.float32) for b in cache.batches(batch_size, max_len, shuffle=False))
    return teacher_forced_quality(drafter, target, batches, num_anchors=num_anchors)

"""Anchor sampling and block construction for DSpark/DFlash training (spec §2.5), per sequence.

Both functions take ONE sequence of static length T and return static shapes, so they can be jitted and
`jax.vmap`-ed over a batch (one PRNG key per sequence).

Layout of a block for anchor a (block size G, slot k = 0..G-1):
    input_ids        [x_a, MASK, ..., MASK]          what the drafter reads
    positions        a + k                           RoPE positions (the anchor keeps its true position)
    labels           x_{a+k+1}                       token slot k predicts (index clamped to T-1)
    eval_mask        prefix-AND over k of (a+k+1 < T) & loss_mask[a+k+1] & valid
    prev_tokens      x_{a+k}                         Markov head teacher forcing: [x_a, x_{a+1}, ..., x_{a+G-1}]
    target_positions min(a + k, T-1)                 row of the target's last hidden/logits predicting label k
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def sample_anchors(key: jax.Array, loss_mask: jax.Array, num_anchors: int) -> tuple[jax.Array, jax.Array]:
    """Draws `num_anchors` anchors uniformly WITHOUT replacement among the candidates of one sequence.

    Candidates are a in [0, T-2] with loss_mask[a] and loss_mask[a+1] (anchor inside the response and its
    first label supervised). Every subset of min(K, #candidates) candidates is equally likely (a uniform
    random permutation, candidates moved to the front stably, the first K kept).

    Returns (anchors [K] int32, valid [K] bool). The valid anchors come FIRST, sorted ascending; when there
    are fewer candidates than K the remaining TRAILING slots are dummies (anchor 0, valid False), so
    `valid` is always a prefix mask (valid == arange(K) < count).
    """
    loss_mask = jnp.asarray(loss_mask).astype(bool)
    (T,) = loss_mask.shape
    K = int(num_anchors)
    n = T - 1                                     # number of possible anchor positions [0, T-2]
    if K <= 0:
        return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)
    if n <= 0:
        return jnp.zeros((K,), jnp.int32), jnp.zeros((K,), bool)
    cand = loss_mask[:-1] & loss_mask[1:]         # [n]
    perm = jax.random.permutation(key, n).astype(jnp.int32)
    order = jnp.argsort(~cand[perm], stable=True)  # candidates first, still in random order
    take = min(K, n)
    chosen = perm[order[:take]]
    chosen_ok = cand[chosen]
    if take < K:
        chosen = jnp.pad(chosen, (0, K - take))
        chosen_ok = jnp.pad(chosen_ok, (0, K - take))
    # Sort ascending with the invalid ones pushed behind every valid anchor (sort key T > any anchor).
    keyed = jnp.sort(jnp.where(chosen_ok, chosen, T))
    valid = keyed < T
    anchors = jnp.where(valid, keyed, 0).astype(jnp.int32)
    return anchors, valid


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Blocks:
    """Training blocks of one sequence ([K, G] leaves; [B, K, G] after vmap). A JAX pytree.

    `anchors`/`valid` ([K]) are carried along for the training attention mask (context key j is visible
    to block b iff j < anchors[b]; rows of invalid blocks are fully masked).
    """
    input_ids: jax.Array         # [K, G] int32: [x_a, MASK x (G-1)]
    positions: jax.Array         # [K, G] int32: a + k (not clamped)
    labels: jax.Array            # [K, G] int32: x_{a+k+1}, index clamped to T-1
    eval_mask: jax.Array         # [K, G] bool: contiguous supervised prefix of each block
    prev_tokens: jax.Array       # [K, G] int32: x_{a+k}, index clamped to T-1 (Markov teacher forcing)
    target_positions: jax.Array  # [K, G] int32: min(a + k, T-1)
    anchors: jax.Array           # [K] int32
    valid: jax.Array             # [K] bool


def build_blocks(tokens: jax.Array, loss_mask: jax.Array, anchors: jax.Array, valid: jax.Array,
                 block_size: int, mask_token_id: int) -> Blocks:
    """Builds the G-slot blocks of one sequence (tokens [T], loss_mask [T]) for anchors [K] (spec §2.5)."""
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    loss_mask = jnp.asarray(loss_mask).astype(bool)
    anchors = jnp.asarray(anchors).astype(jnp.int32)
    valid = jnp.asarray(valid).astype(bool)
    (T,) = tokens.shape
    G = int(block_size)
    k = jnp.arange(G, dtype=jnp.int32)
    pos = anchors[:, None] + k[None, :]                    # [K, G]
    label_idx = pos + 1
    label_idx_c = jnp.minimum(label_idx, T - 1)
    pos_c = jnp.minimum(pos, T - 1)
    anchor_tok = tokens[jnp.clip(anchors, 0, T - 1)]
    input_ids = jnp.where(k[None, :] == 0, anchor_tok[:, None], jnp.int32(mask_token_id)).astype(jnp.int32)
    supervised = (label_idx < T) & loss_mask[label_idx_c] & valid[:, None]
    eval_mask = jnp.cumprod(supervised.astype(jnp.int32), axis=1).astype(bool)
    return Blocks(input_ids=input_ids, positions=pos, labels=tokens[label_idx_c], eval_mask=eval_mask,
                  prev_tokens=tokens[pos_c], target_positions=pos_c, anchors=anchors, valid=valid)

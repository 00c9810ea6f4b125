"""Lossless speculative verification (rejection sampling), pure functions over a batch of blocks.

Accept draft token x_k with probability min(1, p_t(x_k) / p_d(x_k)) left to right; at the first rejection
sample from normalize(max(p_t - p_d, 0)); if every proposed token is accepted sample a bonus from p_t.
With one-hot distributions (temperature 0) this is greedy matching.

The target side is either a dense p_target array or a `LazyTokenProbs` (the verification round): only the
drafted tokens' probabilities and one full row per request (the stopping row) are ever read.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.sampling import LazyTokenProbs, categorical
from dspark_jax.sampling.keys import row_keys, split_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Verdict:
    """num_accepted: [B] leading accepted draft tokens A (<= proposal length); accepted: [B, G] per-position
    accept flags (prefix-closed, False past the proposal); next_token: [B] the correction (A < n) or bonus."""
    num_accepted: jax.Array
    accepted: jax.Array
    next_token: jax.Array


def accept_flags(uniforms: jax.Array, p_target_x: jax.Array, p_draft_x: jax.Array,
                 proposal_len: jax.Array) -> jax.Array:
    """[B, G] prefix-closed flags: u_k · p_d(x_k) < p_t(x_k) (≡ u_k < p_t/p_d) and k < proposal length."""
    g = uniforms.shape[1]
    ok = (uniforms * p_draft_x < p_target_x) & (jnp.arange(g)[None] < proposal_len[:, None])
    return jnp.cumprod(ok.astype(jnp.int32), axis=1).astype(bool)


def residual_distribution(p_target: jax.Array, p_draft: jax.Array) -> jax.Array:
    """normalize(max(p_t - p_d, 0)) over the last axis; falls back to p_t when no mass is left."""
    r = jnp.maximum(p_target - p_draft, 0.0)
    mass = r.sum(-1, keepdims=True)
    return jnp.where(mass > 1e-12, r / jnp.maximum(mass, 1e-30), p_target)


def verify(key: jax.Array, draft_tokens: jax.Array, p_draft_x: jax.Array, p_draft_full_at,
           p_target: jax.Array | LazyTokenProbs, proposal_len: jax.Array,
           row_index: jax.Array | None = None) -> Verdict:
    """Rejection-samples a batch of draft blocks. key: one per request [B] (`sampling.keys`) or one for all.

    draft_tokens: [B, G] target ids; p_draft_x: [B, G] p_d of each drafted token; p_draft_full_at(k): [B] -> [B, V]
    returns the draft distribution at per-request position k over the full vocabulary; proposal_len: [B] in 0..G.
    Target distributions: either p_target [B, G+1, V] (row k scores draft token k, row G is the bonus), or
    flat rows p_target [T, V] with row_index [B, G+1] naming request b's k-th row (the flattened
    verification layout; rows past proposal_len are never read). p_target may be a `LazyTokenProbs` over the
    flat rows (row_index optional as above, rows = b·(G+1) + k): it is indexed exactly like the dense array.
    """
    b, g = draft_tokens.shape
    if row_index is None:
        row_index = jnp.arange(b * (g + 1), dtype=jnp.int32).reshape(b, g + 1)
        if not isinstance(p_target, LazyTokenProbs):
            p_target = p_target.reshape(b * (g + 1), -1)
    row_index = jnp.clip(row_index, 0, p_target.shape[0] - 1)
    keys = row_keys(key, b)  # one key per request: its draws do not depend on the rest of the batch
    k_u, k_next = split_rows(keys, 2)[:, 0], split_rows(keys, 2)[:, 1]
    p_target_x = p_target[row_index[:, :g], draft_tokens]
    uniforms = jax.vmap(lambda k: jax.random.uniform(k, (g,)))(k_u)
    accepted = accept_flags(uniforms, p_target_x, p_draft_x, proposal_len)
    num = accepted.sum(1).astype(jnp.int32)
    stop_row = jnp.take_along_axis(row_index, num[:, None], axis=1)[:, 0]
    rejected = num < proposal_len

    def draw():
        pt_at = p_target[stop_row]
        if g == 0:  # nothing was drafted: the next token comes from the target alone
            return categorical(k_next, jnp.log(jnp.maximum(pt_at, 0.0)))
        dist = jnp.where(rejected[:, None], residual_distribution(pt_at, p_draft_full_at(jnp.minimum(num, g - 1))),
                         pt_at)
        return categorical(k_next, jnp.log(jnp.maximum(dist, 0.0)))

    if isinstance(p_target, LazyTokenProbs):
        # a greedy row's target is one-hot at its argmax, and so is its residual (or the fallback to p_t):
        # the draw is the argmax whatever the key — skip building the rows when every request is greedy
        nxt = jax.lax.cond(jnp.all(p_target.greedy[stop_row]),
                           lambda: p_target.argmax[stop_row].astype(jnp.int32), draw)
    else:
        nxt = draw()
    return Verdict(num_accepted=num, accepted=accepted, next_token=nxt)

"""One verification round over a flattened bucket of tokens — the single verification function used by the
jitted speculative loop (one fixed bucket: every request verifies anchor + G drafts) and by the serving
engine's bucketed step (each request verifies its scheduled prefix, padded to the step's bucket).

Round: the target runs [anchor, x_1..x_n] of every request in one flat forward → lossless rejection sampling
on the first n drafts → stop tokens and the token budget cut the committed tokens → rollback is by positions
(stale K/V past the next anchor are masked) → the verified positions' target features become drafter context.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.decoding.rejection import verify
from dspark_jax.drafters.base import Proposal, RoundOutcome
from dspark_jax.models.kv_cache import KVRows
from dspark_jax.models.layout import TokenLayout, from_grid, to_grid
from dspark_jax.sampling import FilterMode, SamplingParams, lazy_token_probs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundResult:
    """committed [B, G+1]: tokens committed this round (first `count` valid); count [B] (0 for inactive
    requests); num_accepted [B] draft tokens accepted; accept_flags [B, G]; stopped [B] a stop token was
    committed; anchor [B] the next anchor; target_cache / drafter_state after the round; nonfinite [B]: the
    target's logits of an active request were not finite (NaN / inf) in this round — it commits nothing (count 0)
    and must end with an error."""
    committed: jax.Array
    count: jax.Array
    num_accepted: jax.Array
    accept_flags: jax.Array
    stopped: jax.Array
    anchor: jax.Array
    target_cache: object
    drafter_state: object
    nonfinite: jax.Array
    kv_rows: KVRows | None = None


def concat_taps(taps) -> jax.Array | None:
    """Tapped target features [B, T, m·d] (the drafter's context), or None for drafters that tap nothing."""
    return jnp.concatenate(taps, axis=-1) if taps else None


def verify_round(target, drafter, target_cache, drafter_state, proposal: Proposal, anchor: jax.Array, start: jax.Array,
                 num_verify: jax.Array, active: jax.Array, budget: jax.Array, layout: TokenLayout, key: jax.Array,
                 params: SamplingParams, mode: FilterMode, stops: jax.Array, *, write_cache: bool = True) -> RoundResult:
    """Verifies, per request b, the anchor and the first num_verify[b] (0..G) drafts of `proposal`, laid out
    by `layout` (which must give active request b exactly 1 + num_verify[b] rows at positions start[b]..).
    At most budget[b] tokens are committed; inactive requests commit nothing. write_cache=False: the target
    cache is only read and the verified tokens' K/V come back as `kv_rows` (grid [B, Q]) for the caller to
    write — outside a conditional, where writing would copy the whole cache."""
    b, g = proposal.tokens.shape
    taps = drafter.config.target_layer_ids
    grid_tokens = jnp.concatenate([anchor[:, None], proposal.tokens], axis=1)  # [B, G+1]
    out = target.forward_flat(from_grid(grid_tokens, layout), layout, target_cache, tap_layers=taps,
                              write=write_cache)
    row_params = jax.tree.map(lambda a: a[layout.slot], params)
    logits = target.logits(out.hidden)
    # token_probs [T, V], read only at the drafted tokens and at each request's stopping row (never materialised)
    p_target = lazy_token_probs(logits, row_params, mode)
    row_nonfinite = to_grid(~p_target.finite, layout, fill=False)  # [B, G+1]
    # deterministic (lookup) drafts: p_d is one-hot at each drafted token — all rows, or those flagged
    all_det, some_det = proposal.p_draft is None, proposal.deterministic
    ones = jnp.ones(proposal.tokens.shape, jnp.float32)
    if all_det:
        p_dx = ones
    else:
        p_dx = jnp.take_along_axis(proposal.p_draft, proposal.draft_index[..., None], axis=-1)[..., 0]
        if some_det is not None:
            p_dx = jnp.where(some_det[:, None], ones, p_dx)

    def p_draft_full_at(k):
        token = jnp.take_along_axis(proposal.tokens, k[:, None], axis=1)[:, 0]
        one_hot = jax.nn.one_hot(token, p_target.shape[-1], dtype=jnp.float32)
        if all_det:
            return one_hot
        row = jnp.take_along_axis(proposal.p_draft, k[:, None, None], axis=1)[:, 0]  # [B, N]
        if not drafter.full_vocab:
            row = jnp.zeros((b, p_target.shape[-1]), row.dtype).at[:, drafter.draft_to_target[...]].set(row)
        return row if some_det is None else jnp.where(some_det[:, None], one_hot, row)

    verdict = verify(key, proposal.tokens, p_dx, p_draft_full_at, p_target, num_verify, row_index=layout.grid)
    a = verdict.num_accepted
    slots = jnp.arange(g + 1)[None]
    # a row whose distribution decided something (rows 0..a: acceptances, then the next token) was not finite
    nonfinite = (row_nonfinite & (slots <= a[:, None])).any(1) & active
    committed = jnp.concatenate([proposal.tokens, jnp.zeros((b, 1), jnp.int32)], 1)
    committed = jnp.where(slots == a[:, None], verdict.next_token[:, None], committed)
    is_stop = jnp.isin(committed, stops) & (slots <= a[:, None])
    count = jnp.where(is_stop.any(1), jnp.argmax(is_stop, 1) + 1, a + 1)
    count = jnp.where(active & ~nonfinite, jnp.minimum(count, budget), 0)
    stopped = is_stop.any(1) & (jnp.argmax(is_stop, 1) + 1 <= count)
    features = to_grid(concat_taps(out.taps), layout) if taps else None  # [B, G+1, m·d]
    outcome = RoundOutcome(num_verified=num_verify, committed=committed, deterministic=proposal.deterministic,
                           model_skipped=proposal.model_skipped, model_confidence=proposal.model_confidence,
                           lookup_draft=proposal.lookup_draft)
    drafter_state = drafter.commit(target, drafter_state, features, grid_tokens, start, count, outcome)
    last = jnp.take_along_axis(committed, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    return RoundResult(committed=committed, count=count, num_accepted=jnp.where(active, a, 0),
                       accept_flags=verdict.accepted & active[:, None], stopped=stopped,
                       anchor=jnp.where(count > 0, last, anchor), target_cache=out.cache, drafter_state=drafter_state,
                       nonfinite=nonfinite, kv_rows=None if write_cache else _kv_rows(out, layout))


def _kv_rows(out, layout: TokenLayout) -> KVRows:
    """The flat forward's new K/V on the request grid [B, Q] (`forward_flat(write=False)`)."""
    grid = lambda rows: tuple(to_grid(r, layout) for r in rows)  # noqa: E731
    return KVRows(grid(out.new_k), grid(out.new_v), to_grid(layout.position, layout, fill=-1))

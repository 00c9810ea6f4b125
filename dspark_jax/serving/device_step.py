"""The engine's device-side functions over a fixed set of request slots: admit requests into slots
(prefill + first token + first proposal), run one bucketed draft–verify step, free a slot.

All are pure functions of (graphdefs, states, EngineState, ...) so the host can AOT-compile each shape once.
"""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.decoding.autoregressive import prefill
from dspark_jax.decoding.draft_length import allocate_top_k, proposal_lengths
from dspark_jax.decoding.verification import concat_taps, verify_round
from dspark_jax.drafters.base import Proposal
from dspark_jax.models.kv_cache import init_cache
from dspark_jax.models.layout import make_layout
from dspark_jax.sampling import FilterMode, SamplingParams, check_batch, sample_checked
from dspark_jax.sampling.keys import DRAFT, SAMPLE, VERIFY, position_keys


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EngineState:
    """Per slot s: target cache rows, drafter state, the anchor token at position start[s] (its K/V not yet
    written), active flag, token budget left, sampling params, the pending proposal for the next step and the
    request's random key (keys [S]: every draw of a request comes from its own key, `sampling.keys`)."""
    target_cache: object
    drafter_state: object
    anchor: jax.Array
    start: jax.Array
    active: jax.Array
    budget: jax.Array
    params: SamplingParams
    proposal: Proposal
    keys: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
    """committed [S, G+1] (first count[s] valid), count [S], verified [S] draft tokens verified, accepted [S],
    finished [S] (stop token or budget reached this step), confidence [S, G] of the next proposal, nonfinite [S]
    (the slot's target logits were NaN / inf: it committed nothing and is deactivated)."""
    committed: jax.Array
    count: jax.Array
    verified: jax.Array
    accepted: jax.Array
    finished: jax.Array
    confidence: jax.Array
    nonfinite: jax.Array


def init_engine_state(target, drafter, slots: int, max_len: int) -> EngineState:
    def zeros_i():
        return jnp.zeros((slots,), jnp.int32)  # distinct buffers: the state is donated leaf by leaf

    drafter_state = drafter.init_state(slots, max_len)
    # an empty proposal of exactly the structure this drafter proposes (p_draft or not, lengths, flags)
    shapes = jax.eval_shape(lambda d: drafter.propose(target, d, zeros_i(), zeros_i(), jax.random.key(0),
                                                      SamplingParams.create(slots), FilterMode(),
                                                      drafter.head_rows(target)), drafter_state)
    proposal = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    return EngineState(target_cache=init_cache(target.config, slots, max_len, target.dtype), drafter_state=drafter_state,
                       anchor=zeros_i(), start=zeros_i(), active=jnp.zeros((slots,), bool), budget=zeros_i(),
                       params=SamplingParams.create(slots), proposal=proposal,
                       keys=jax.random.split(jax.random.key(0), slots))


def _set_rows(full, rows, slots):
    """Writes the batch-n pytree `rows` into rows `slots` [n] of the batch-S pytree `full`."""
    return jax.tree.map(lambda f, r: f.at[slots].set(r.astype(f.dtype)), full, rows)


def admit(target_graphdef, target_state, drafter_graphdef, drafter_state, head, state: EngineState, slots: jax.Array,
          prompts: jax.Array, prompt_lens: jax.Array, params: SamplingParams, max_new_tokens: jax.Array,
          keys: jax.Array, stops: jax.Array, *, mode: FilterMode) -> tuple[EngineState, jax.Array, jax.Array, jax.Array]:
    """Prefills right-padded prompts [n, P] into `slots` [n]; samples each first token; drafts each first
    proposal (head: `decoding.speculative.draft_head`'s output, gathered once per engine). params: batch-n
    SamplingParams; keys [n]: the requests' keys (`sampling.keys.request_keys`).
    Returns (state, first tokens [n], already finished [n], non-finite prefill logits [n] — such a request is
    not activated and must end with an error)."""
    check_batch(prompts, prompt_lens, params)
    chex.assert_shape([slots, max_new_tokens, keys], (prompts.shape[0],))
    target = nnx.merge(target_graphdef, target_state)
    drafter = nnx.merge(drafter_graphdef, drafter_state)
    n = prompts.shape[0]
    max_len = state.target_cache.max_len
    lens = prompt_lens.astype(jnp.int32)
    k_first, k_draft = position_keys(keys, lens - 1, SAMPLE), position_keys(keys, lens, DRAFT)
    logits, out = prefill(target, prompts, lens, max_len, tap_layers=drafter.config.target_layer_ids)
    first, finite = sample_checked(k_first, logits, params, mode)
    drafter_state = drafter.prefill(target, drafter.init_state(n, max_len), concat_taps(out.taps), prompts, lens)
    prop = drafter.propose(target, drafter_state, first, lens, k_draft, params, mode, head)
    nonfinite = ~finite
    finished = jnp.isin(first, stops) | (max_new_tokens <= 1) | nonfinite
    state = dataclasses.replace(
        state, target_cache=_set_rows(state.target_cache, out.cache, slots), drafter_state=_set_rows(state.drafter_state, drafter_state, slots),
        anchor=state.anchor.at[slots].set(first), start=state.start.at[slots].set(lens),
        active=state.active.at[slots].set(~finished), budget=state.budget.at[slots].set(max_new_tokens - 1),
        params=_set_rows(state.params, params, slots), proposal=_set_rows(state.proposal, prop, slots),
        keys=state.keys.at[slots].set(keys))
    return state, first, finished, nonfinite


def deactivate(state: EngineState, slot: jax.Array) -> EngineState:
    """Frees a slot (cancellation); its rows are overwritten by the next admission."""
    return dataclasses.replace(state, active=state.active.at[slot].set(False))


def step(target_graphdef, target_state, drafter_graphdef, drafter_state, head, state: EngineState, caps: jax.Array,
         floors: jax.Array, draft_budget: jax.Array, stops: jax.Array, *, bucket: int, draft: bool, mode: FilterMode,
         kv_len: int | None = None) -> tuple[EngineState, StepOutput]:
    """Verifies the pending proposals and drafts the next ones (head: `decoding.speculative.draft_head`'s
    output, gathered once per engine).

    Each active slot verifies its anchor plus ℓ_s drafts, ℓ = the `draft_budget` drafts of highest fresh
    survival product within per-slot caps (`allocate_top_k`; with draft_budget = Σ caps every capped draft is
    taken, which is how static policies and the synchronous scheduler pass exact lengths); caps are also cut
    at the first fresh confidence below floors[s] (a per-request confidence floor). The tokens are
    laid out flat in `bucket` rows. `draft=False` (plain decoding) skips the drafter. kv_len (static): the target
    attends over the first kv_len cache positions only (None: all max_len); the caller guarantees every active
    slot's start + G + 1 <= kv_len (rows written past it would be dropped) — `Engine` picks it per step."""
    chex.assert_shape([caps, floors], state.active.shape)
    chex.assert_type(caps, int)
    chex.assert_rank([draft_budget, stops], [0, 1])
    target = nnx.merge(target_graphdef, target_state)
    drafter = nnx.merge(drafter_graphdef, drafter_state)
    s, g = state.proposal.tokens.shape
    active = state.active
    n_active = active.sum().astype(jnp.int32)
    budget = jnp.clip(draft_budget, 0, bucket - n_active)
    caps = jnp.where(active, jnp.minimum(caps, g), 0) if draft else jnp.zeros_like(caps)
    caps = jnp.minimum(caps, jnp.minimum(proposal_lengths(state.proposal.confidence, floors),
                                         state.proposal.num_drafted))
    verified = allocate_top_k(state.proposal.confidence, caps, budget)
    layout = make_layout(jnp.where(active, verified + 1, 0), state.start, bucket, g + 1)
    k_verify = position_keys(state.keys, state.start, VERIFY)
    short = kv_len is not None and kv_len < state.target_cache.max_len
    cache = state.target_cache.prefix(kv_len) if short else state.target_cache
    res = verify_round(target, drafter, cache, state.drafter_state, state.proposal, state.anchor, state.start,
                       verified, active, state.budget, layout, k_verify, state.params, mode, stops)
    target_cache = state.target_cache.with_prefix(res.target_cache) if short else res.target_cache
    start = state.start + res.count
    left = state.budget - res.count
    still = active & ~res.stopped & (left > 0) & ~res.nonfinite
    proposal = state.proposal
    if draft:
        proposal = drafter.propose(target, res.drafter_state, res.anchor, start, position_keys(state.keys, start, DRAFT),
                                   state.params, mode, head)
    new = EngineState(target_cache=target_cache, drafter_state=res.drafter_state, anchor=res.anchor, start=start, active=still,
                      budget=left, params=state.params, proposal=proposal, keys=state.keys)
    return new, StepOutput(committed=res.committed, count=res.count, verified=jnp.where(active, verified, 0),
                           accepted=res.num_accepted, finished=active & ~still, confidence=proposal.confidence,
                           nonfinite=res.nonfinite)

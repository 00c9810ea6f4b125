"""The speculative draft–verify loop: one jitted `lax.while_loop` over a batch of requests.

Round: drafter proposes G tokens after the anchor → optional static confidence threshold truncates the
proposal → the target verifies [anchor, x_1..x_G] in one forward → lossless rejection sampling → stop
tokens inside the accepted prefix → rollback by cache lengths (stale K/V lie past the next anchor and are
masked) → the verified positions' target features become drafter context.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.decoding.autoregressive import prefill
from dspark_jax.decoding.draft_length import choose_width, proposal_lengths
from dspark_jax.decoding.verification import concat_taps, verify_round
from dspark_jax.drafters.base import Proposal
from dspark_jax.models.layout import dense_layout
from dspark_jax.sampling import FilterMode, SamplingParams, check_batch, sample
from dspark_jax.sampling.keys import DRAFT, SAMPLE, VERIFY, position_keys, row_keys


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundStats:
    """Per request and round (slot r < rounds[b]): proposed [B, R] draft tokens, accepted [B, R], committed
    [B, R] (bonus included), accept_flags [B, R, G], confidence and confidence_logits [B, R, G]."""
    proposed: jax.Array
    accepted: jax.Array
    committed: jax.Array
    accept_flags: jax.Array
    confidence: jax.Array
    confidence_logits: jax.Array

    @staticmethod
    def zeros(batch: int, max_rounds: int, gamma: int) -> "RoundStats":
        counts = jnp.zeros((batch, max_rounds), jnp.int32)
        per_draft = jnp.zeros((batch, max_rounds, gamma), jnp.float32)
        return RoundStats(proposed=counts, accepted=counts, committed=counts,
                          accept_flags=jnp.zeros((batch, max_rounds, gamma), bool), confidence=per_draft,
                          confidence_logits=per_draft)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    """The loop's carry: keys [B] per request; anchor [B] the last committed token, at position start [B];
    the target's KV cache and the drafter's state; tokens [B, max_new + G + 1] generated so far (num_generated
    [B] valid); done [B]; rounds [B]; stats; nonfinite [B] (see SpecOutput)."""
    keys: jax.Array
    anchor: jax.Array
    start: jax.Array
    target_cache: object
    drafter_state: object
    tokens: jax.Array
    num_generated: jax.Array
    done: jax.Array
    rounds: jax.Array
    stats: RoundStats
    nonfinite: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecOutput:
    """tokens [B, max_new_tokens]; num_tokens [B]; rounds [B] verification rounds per request;
    per round r < rounds[b]: proposed [B, R], accepted [B, R] (draft tokens accepted), committed [B, R]
    (tokens committed, bonus included), accept_flags [B, R, G], confidence [B, R, G] (calibrated c_k),
    confidence_logits [B, R, G]; nonfinite [B]: the request stopped because the target's logits were not finite
    (NaN / inf) — its tokens end before that round."""
    tokens: jax.Array
    num_tokens: jax.Array
    rounds: jax.Array
    proposed: jax.Array
    accepted: jax.Array
    committed: jax.Array
    accept_flags: jax.Array
    confidence: jax.Array
    confidence_logits: jax.Array
    nonfinite: jax.Array


def _pad_slots(x: jax.Array, width: int) -> jax.Array:
    """[B, w, ...] → [B, width, ...], zeros (False) appended along axis 1."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, width - x.shape[1])
    return jnp.pad(x, pad)


def _first_drafts(proposal: Proposal, k: int) -> Proposal:
    """The proposal cut to its first k draft tokens (k = 0: a round that verifies the anchor alone, a plain
    step)."""
    cut = lambda a: None if a is None else a[:, :k]  # noqa: E731
    return Proposal(tokens=cut(proposal.tokens), draft_index=cut(proposal.draft_index), p_draft=cut(proposal.p_draft),
                    confidence=cut(proposal.confidence), confidence_logits=cut(proposal.confidence_logits),
                    length=None if proposal.length is None else jnp.minimum(proposal.length, k),
                    deterministic=proposal.deterministic)


@functools.partial(jax.jit, static_argnames=("target_graphdef", "drafter_graphdef", "max_new_tokens", "stop_ids",
                                             "mode", "pad_id", "attn_impl", "verify_widths",
                                             "verify_costs"))
def speculative_generate(target_graphdef: nnx.GraphDef, target_state: nnx.State, drafter_graphdef: nnx.GraphDef,
                         drafter_state: nnx.State, prompts: jax.Array, prompt_lens: jax.Array, key: jax.Array,
                         params: SamplingParams, confidence_threshold: jax.Array, *, max_new_tokens: int,
                         stop_ids: tuple[int, ...], mode: FilterMode = FilterMode(), pad_id: int = 0,
                         attn_impl: str = "reference", verify_widths: tuple[int, ...] | None = None,
                         verify_costs: tuple[float, ...] | None = None) -> SpecOutput:
    """Lossless speculative decoding of right-padded prompts [B, P] (lengths [B]); exactly
    `max_new_tokens` per request, or fewer up to and including a stop token. key: one per request [B] or one
    for the batch (`sampling.keys`).

    Each round verifies every request at one width (anchor + drafts) out of `verify_widths` (ascending,
    from 1 to at most G + 1; default (1, G + 1): a round where nothing was drafted is a plain step), each
    compiled once. Without `verify_costs` a round takes the narrowest width holding every proposal; with
    them (one per width, e.g. measured seconds) the one with the most expected committed tokens per cost
    (`decoding.draft_length.choose_width`, hardware-aware draft length)."""
    check_batch(prompts, prompt_lens, params)
    target = nnx.merge(target_graphdef, target_state)
    drafter = nnx.merge(drafter_graphdef, drafter_state)
    g = drafter.config.block_size
    taps = drafter.config.target_layer_ids
    b, p = prompts.shape
    cache_len = p + max_new_tokens + g + 1
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    head = drafter.head_matrix(target)
    widths = tuple(verify_widths or (1, g + 1))
    if list(widths) != sorted(set(widths)) or widths[0] != 1 or widths[-1] > g + 1:
        raise ValueError(f"verify_widths must increase from 1 to at most G + 1 = {g + 1}, got {widths}")
    if verify_costs is not None and len(verify_costs) != len(widths):
        raise ValueError(f"one verify cost per width needed: {len(widths)} widths, {len(verify_costs)} costs")

    keys = row_keys(key, b)  # one per request: `sampling.keys`
    logits, out = prefill(target, prompts, prompt_lens, cache_len, attn_impl, tap_layers=taps)
    first = sample(position_keys(keys, prompt_lens - 1, SAMPLE), logits, params, mode)
    first_drafter_state = drafter.prefill(target, drafter.init_state(b, cache_len), concat_taps(out.taps),
                                          prompts, prompt_lens)

    buf_len = max_new_tokens + g + 1
    r_max = max_new_tokens
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    state = SpecState(keys=keys, anchor=first, start=prompt_lens.astype(jnp.int32), target_cache=out.cache,
                      drafter_state=first_drafter_state,
                      tokens=jnp.full((b, buf_len), pad_id, jnp.int32).at[:, 0].set(first),
                      num_generated=jnp.ones((b,), jnp.int32),
                      done=jnp.isin(first, stops) | (max_new_tokens <= 1) | ~finite,
                      rounds=jnp.zeros((b,), jnp.int32), stats=RoundStats.zeros(b, r_max, g), nonfinite=~finite)

    def body(c: SpecState) -> SpecState:
        anchor, start, active = c.anchor, c.start, ~c.done
        k_draft, k_verify = position_keys(c.keys, start, DRAFT), position_keys(c.keys, start, VERIFY)
        prop = drafter.propose(target, c.drafter_state, anchor, start, k_draft, params, mode, head, attn_impl)
        n_prop = jnp.minimum(proposal_lengths(prop.confidence, confidence_threshold), prop.num_drafted)
        n_prop = jnp.where(c.done, 0, n_prop)

        def at_width(width):  # a round verifying anchor + up to width − 1 drafts per request
            def branch():
                r = verify_round(target, drafter, c.target_cache, c.drafter_state, _first_drafts(prop, width - 1),
                                 anchor, start, jnp.minimum(n_prop, width - 1), active,
                                 max_new_tokens - c.num_generated, dense_layout(b, width, start), k_verify, params,
                                 mode, stops, attn_impl)
                return dataclasses.replace(r, committed=_pad_slots(r.committed, g + 1),
                                           accept_flags=_pad_slots(r.accept_flags, g))
            return branch

        choice = choose_width(prop.confidence, n_prop, active, widths, verify_costs)
        res = jax.lax.switch(choice, [at_width(w) for w in widths])
        n_prop = jnp.minimum(n_prop, jnp.asarray(widths)[choice] - 1)
        count = res.count
        finished = res.stopped | (c.num_generated + count >= max_new_tokens) | res.nonfinite

        write = jax.vmap(lambda row, new, s: jax.lax.dynamic_update_slice(row, new, (s,)))
        keep = jnp.arange(g + 1)[None] < count[:, None]
        old = jax.vmap(lambda row, s: jax.lax.dynamic_slice(row, (s,), (g + 1,)))(c.tokens, c.num_generated)
        tokens = write(c.tokens, jnp.where(keep, res.committed, old), c.num_generated)

        rows, slot = jnp.arange(b), jnp.minimum(c.rounds, r_max - 1)

        def record(arr, val):  # this round's value in each active request's round slot
            cur = arr[rows, slot]
            return arr.at[rows, slot].set(jnp.where(active.reshape((b,) + (1,) * (val.ndim - 1)), val, cur))

        st = c.stats
        stats = RoundStats(proposed=record(st.proposed, n_prop), accepted=record(st.accepted, res.num_accepted),
                           committed=record(st.committed, count),
                           accept_flags=record(st.accept_flags, res.accept_flags),
                           confidence=record(st.confidence, prop.confidence),
                           confidence_logits=record(st.confidence_logits, prop.confidence_logits))
        return SpecState(keys=c.keys, anchor=res.anchor, start=start + count, target_cache=res.target_cache,
                         drafter_state=res.drafter_state, tokens=tokens, num_generated=c.num_generated + count,
                         done=c.done | finished, rounds=c.rounds + active.astype(jnp.int32), stats=stats,
                         nonfinite=c.nonfinite | res.nonfinite)

    final = jax.lax.while_loop(lambda c: ~jnp.all(c.done), body, state)
    return SpecOutput(tokens=final.tokens[:, :max_new_tokens], num_tokens=final.num_generated, rounds=final.rounds,
                      nonfinite=final.nonfinite, **vars(final.stats))

"""The speculative draft–verify loop: one jitted `lax.while_loop` over a batch of requests.

Round: drafter proposes G tokens after the anchor → optional static confidence threshold truncates the
proposal → the target verifies every active request's [anchor, x_1..x_ℓ] in one forward over a flat bucket of
rows (ℓ per request: `decoding.draft_length`) → lossless rejection sampling → stop
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
from dspark_jax.decoding.draft_length import (bucket_rates, budget_confidence, choose_bucket, expected_committed,
                                              gated_choice, gated_rates, per_request_rows, proposal_lengths, slack_of,
                                              verified_drafts)
from dspark_jax.decoding.verification import RoundResult, concat_taps, verify_round
from dspark_jax.drafters.base import Proposal
from dspark_jax.models.layout import dense_layout, make_layout
from dspark_jax.models.output_head import HeadRows
from dspark_jax.sampling import FilterMode, SamplingParams, check_batch, sample_checked
from dspark_jax.sampling.keys import DRAFT, SAMPLE, VERIFY, position_keys, row_keys
from dspark_jax.utils.trees import describe_tree


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundStats:
    """Per request and round (slot r < rounds[b]): proposed [B, R] draft tokens, accepted [B, R], committed
    [B, R] (bonus included), accept_flags [B, R, G], confidence and confidence_logits [B, R, G], model_forward
    [B, R] (bool: the round ran the drafter model's forward — not a plain round, not prompt lookup's draft alone,
    not a hybrid's round that skipped its model); lookup_draft [B, R] (bool: the verified draft was a deterministic
    lookup draft — prompt lookup's, or a hybrid row that took its lookup's; False in plain rounds); lookup_expected
    [B, R] (a hybrid's lookup proposal's expected accepted length in the round, whichever draft it verified;
    prompt lookup alone: its own; 0 for model drafters and plain rounds — `Proposal.lookup_expected`)."""
    proposed: jax.Array
    accepted: jax.Array
    committed: jax.Array
    accept_flags: jax.Array
    confidence: jax.Array
    confidence_logits: jax.Array
    model_forward: jax.Array
    lookup_draft: jax.Array
    lookup_expected: jax.Array

    @staticmethod
    def zeros(batch: int, max_rounds: int, gamma: int) -> "RoundStats":
        counts = jnp.zeros((batch, max_rounds), jnp.int32)
        per_draft = jnp.zeros((batch, max_rounds, gamma), jnp.float32)
        return RoundStats(proposed=counts, accepted=counts, committed=counts,
                          accept_flags=jnp.zeros((batch, max_rounds, gamma), bool), confidence=per_draft,
                          confidence_logits=per_draft, model_forward=jnp.zeros((batch, max_rounds), bool),
                          lookup_draft=jnp.zeros((batch, max_rounds), bool),
                          lookup_expected=jnp.zeros((batch, max_rounds), jnp.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    """The loop's carry: keys [B] per request; anchor [B] the last committed token, at position start [B];
    the target's KV cache and the drafter's state; tokens [B, max_new + G + 1] generated so far (num_generated
    [B] valid); done [B]; rounds [B]; stats; nonfinite [B] (see SpecOutput); the plain-round gate's scalars:
    plain_left (plain rounds before the next drafted one) and backoff (the next plain run's length);
    stale_confidence [B, G]: each request's confidences of its last drafted round (−1 before one;
    `draft_length.budget_confidence`); progress [2]: Σ realized and Σ expected progress beyond a plain round's
    over the drafted rounds so far (`_Rounds.progress_scale`); declined: scalar, the gate's declined rounds so
    far (`_Rounds.drafted`)."""
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
    plain_left: jax.Array
    backoff: jax.Array
    stale_confidence: jax.Array
    progress: jax.Array
    declined: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecOutput:
    """tokens [B, max_new_tokens]; num_tokens [B]; rounds [B] verification rounds per request;
    per round r < rounds[b]: proposed [B, R], accepted [B, R] (draft tokens accepted), committed [B, R]
    (tokens committed, bonus included), accept_flags [B, R, G], confidence [B, R, G] (calibrated c_k),
    confidence_logits [B, R, G], model_forward, lookup_draft, lookup_expected [B, R] (`RoundStats`); nonfinite [B]:
    the request stopped because
    the target's logits were not finite (NaN / inf) — its tokens end before that round; declined_rounds: scalar,
    the gate's declined rounds (proposals the batch did not verify, not among the rounds: `_Rounds.drafted`)."""
    tokens: jax.Array
    num_tokens: jax.Array
    rounds: jax.Array
    proposed: jax.Array
    accepted: jax.Array
    committed: jax.Array
    accept_flags: jax.Array
    confidence: jax.Array
    confidence_logits: jax.Array
    model_forward: jax.Array
    lookup_draft: jax.Array
    lookup_expected: jax.Array
    nonfinite: jax.Array
    declined_rounds: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Outcome:
    """What a drafted or plain round computed, before anything is written into the state: the verification
    (its K/V still unwritten: `RoundResult.kv_rows`), verified [B] drafts per request, the round's confidence /
    confidence_logits [B, G] to record, the gate's next plain_left, backoff and stale_confidence, and each
    request's expected position after the round [B] (slack + expected committed tokens: the terms of
    `draft_length.fluid_gain`, from the round's fresh confidences) for the progress record; model_forward,
    lookup_draft, lookup_expected [B]: the round's source (`RoundStats`); declined: scalar bool, the gate declined
    the round (`_Rounds.drafted`): nothing was verified or committed."""
    res: RoundResult
    verified: jax.Array
    confidence: jax.Array
    confidence_logits: jax.Array
    model_forward: jax.Array
    lookup_draft: jax.Array
    lookup_expected: jax.Array
    plain_left: jax.Array
    backoff: jax.Array
    stale_confidence: jax.Array
    expected: jax.Array
    declined: jax.Array | bool = False


def _pad_slots(x: jax.Array, width: int) -> jax.Array:
    """[B, w, ...] → [B, width, ...], zeros (False) appended along axis 1."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, width - x.shape[1])
    return jnp.pad(x, pad)


def _first_drafts(proposal: Proposal, k: int) -> Proposal:
    """The proposal cut to its first k draft tokens (k = 0: a round that verifies the anchor alone, a plain
    step); a hybrid's model_confidence stays whole (a record of the model's round, not of the verified drafts)."""
    cut = lambda a: None if a is None else a[:, :k]  # noqa: E731
    return Proposal(tokens=cut(proposal.tokens), draft_index=cut(proposal.draft_index), p_draft=cut(proposal.p_draft),
                    confidence=cut(proposal.confidence), confidence_logits=cut(proposal.confidence_logits),
                    length=None if proposal.length is None else jnp.minimum(proposal.length, k),
                    deterministic=proposal.deterministic, model_skipped=proposal.model_skipped,
                    model_confidence=proposal.model_confidence, lookup_expected=proposal.lookup_expected,
                    lookup_draft=proposal.lookup_draft)


def _model_forward(proposal: Proposal, batch: int) -> jax.Array:
    """[B] bool: whether `proposal` ran a drafter model's forward — for a hybrid, unless the round skipped it
    (`Proposal.model_skipped`); otherwise whenever its drafts have distributions (p_draft: a model's; prompt
    lookup's deterministic drafts have none)."""
    if proposal.model_skipped is not None:
        return ~proposal.model_skipped
    return jnp.full((batch,), proposal.p_draft is not None)


def _deterministic_rows(proposal: Proposal, batch: int) -> jax.Array:
    """[B] bool: rows whose draft tokens are deterministic (one-hot p_d: lookup)."""
    if proposal.p_draft is None:
        return jnp.ones((batch,), bool)
    return jnp.zeros((batch,), bool) if proposal.deterministic is None else proposal.deterministic


def _lookup_expected(proposal: Proposal, batch: int) -> jax.Array:
    """[B] the round's lookup proposal's expected accepted length (`RoundStats.lookup_expected`; 0 without one)."""
    if proposal.lookup_expected is None:
        return jnp.zeros((batch,), jnp.float32)
    return proposal.lookup_expected.astype(jnp.float32)


_STATIC = ("target_graphdef", "drafter_graphdef", "max_new_tokens", "stop_ids", "mode", "pad_id", "verify_buckets",
           "verify_costs", "plain_cost", "lookup_costs", "progress_prior")
MAX_PLAIN_RUN = 16  # the longest run of plain rounds between two drafted rounds (the gate's back-off cap)


@dataclasses.dataclass(frozen=True)
class _Rounds:
    """What every round of one call shares: the merged modules, sampling settings and the bucket / cost
    configuration (fixed while tracing). `start` prefills; `step` runs one round. `head`: the drafter's output
    embedding rows (`head_rows`: a `HeadRows`, with the target's int8 blocks where its head runs the kernel),
    gathered outside the loop — by the caller once for all its calls
    (`draft_head`), else once per call (a 32k-row gather from the target's 262k-row embedding costs more than
    the draft layer itself on a CPU: ~24 ms, BENCHMARKS.md "Session 34")."""
    target: nnx.Module
    drafter: nnx.Module
    head: HeadRows | jax.Array | None
    params: SamplingParams
    mode: FilterMode
    stops: jax.Array
    threshold: jax.Array
    max_new_tokens: int
    buckets: tuple[int, ...]
    costs: tuple[float, ...] | None
    plain_cost: float | None
    lookup_costs: tuple[float, ...] | None = None  # a hybrid's rounds that skip its model's forward, per bucket
    objective: str = "fluid"  # `draft_length.GAINS` (benchmarks/schedule_sim.py replays the others)
    progress_prior: float | None = None  # expected progress the objective is trusted for (`progress_scale`)

    def __post_init__(self):
        if self.progress_prior is not None and self.objective != "fluid":
            raise ValueError(f"the progress record measures the fluid objective's progress, not {self.objective!r}: "
                             "use progress_prior=None with other objectives")

    def progress_scale(self, c: SpecState) -> jax.Array:
        """Scalar in [0, 1]: how much of the objective's expected progress beyond a plain round's this batch's
        drafted rounds have realized — (Σ realized + s) / (Σ expected + s) over its earlier drafted rounds, s =
        `progress_prior` (None: 1, no correction). At batch 8 the fluid objective (min over requests of their
        expected positions) promises more than the minimum of their realized positions brings: on gsm8k's first 8
        held-out prompts the per-request expected committed tokens were right (481 expected, 496 committed) but
        the longest request's expected progress was 81 tokens where 62 came (BENCHMARKS.md "Session 33"). The
        rates scale each bucket's gain g to 1 + scale · (g − 1) (`draft_length.bucket_rates`). Capped at 1: the
        per-request acceptance is the confidences' and their record's to correct — and at batch 1, where the
        longest request is the only one, there is no minimum to be optimistic about: 1. Reads only earlier
        rounds: lossless. The record measures the fluid objective's progress: with another `objective` it is
        refused (`__post_init__`)."""
        if self.progress_prior is None or c.num_generated.shape[0] == 1:
            return jnp.float32(1.0)
        realized, expected = c.progress[0], c.progress[1]
        return jnp.clip((realized + self.progress_prior) / (expected + self.progress_prior), 0.0, 1.0)

    def round_costs(self, proposal: Proposal):
        """The bucket costs of this round: `lookup_costs` where a hybrid drafter skipped its model's forward
        (`Proposal.model_skipped`, decided from the lookup's proposal, earlier rounds and the costs, before any
        bucket is chosen), else `costs` (profiled with the model's forward)."""
        if self.lookup_costs is None or proposal.model_skipped is None:
            return self.costs
        return jnp.where(jnp.all(proposal.model_skipped), jnp.asarray(self.lookup_costs, jnp.float32),
                         jnp.asarray(self.costs, jnp.float32))

    def model_pays(self, active: jax.Array, remaining: jax.Array, scale: jax.Array):
        """A hybrid drafter's test of whether to run its model's forward this round (`drafters.hybrid`,
        `price_model`): f(lookup confidence [B, G], lookup drafted [B], predicted confidence [B, G], predicted
        drafted [B]) → whether the best bucket's rate (`draft_length.bucket_rates`, the threshold applied, gains
        scaled by `scale`: `progress_scale`) of the predicted rows at `costs` (rounds that run the model) exceeds
        the lookup rows' at `lookup_costs` and, with the gate on, a plain round's (`draft_length.gated_choice`):
        a forward whose round is not expected to beat a plain round only makes the gate's probe dearer."""
        def rates(confidence, drafted, costs):
            n = self.proposed(confidence, drafted, active)
            return bucket_rates(confidence, n, active, remaining, self.buckets, costs, self.objective, scale)

        def model_rates(confidence, drafted):  # (rates at `costs`, whether the best beats a plain round)
            if not self.gate:
                return rates(confidence, drafted, self.costs), jnp.bool_(True)
            n = self.proposed(confidence, drafted, active)
            rate, _, beats_plain = gated_rates(confidence, n, active, remaining, self.buckets, self.costs,
                                               self.plain_cost, self.objective, scale)
            return rate, beats_plain

        def pays(lookup_confidence, lookup_drafted, confidence, drafted):
            rate, beats_plain = model_rates(confidence, drafted)
            return beats_plain & (jnp.max(rate) > jnp.max(rates(lookup_confidence, lookup_drafted,
                                                                  self.lookup_costs)))
        return pays

    def proposed(self, confidence: jax.Array, drafted: jax.Array, active: jax.Array) -> jax.Array:
        """[B] drafts each request offers for verification: its drafted tokens [B] cut where the confidence [B, G]
        falls below the threshold (`proposal_lengths`), 0 for inactive requests."""
        return jnp.where(active, jnp.minimum(proposal_lengths(confidence, self.threshold), drafted), 0)

    @property
    def gate(self) -> bool:
        """Whether rounds may skip the drafter (plain rounds): with costs for every bucket and the plain round."""
        return self.costs is not None and self.plain_cost is not None

    def start(self, prompts: jax.Array, prompt_lens: jax.Array, key: jax.Array, pad_id: int) -> SpecState:
        target, drafter = self.target, self.drafter
        g = drafter.config.block_size
        b, p = prompts.shape
        cache_len = p + self.max_new_tokens + g + 1
        keys = row_keys(key, b)  # one per request: `sampling.keys`
        logits, out = prefill(target, prompts, prompt_lens, cache_len, tap_layers=drafter.config.target_layer_ids)
        first, finite = sample_checked(position_keys(keys, prompt_lens - 1, SAMPLE), logits, self.params, self.mode)
        drafter_state = drafter.prefill(target, drafter.init_state(b, cache_len), concat_taps(out.taps), prompts,
                                        prompt_lens)
        return SpecState(keys=keys, anchor=first, start=prompt_lens.astype(jnp.int32), target_cache=out.cache,
                         drafter_state=drafter_state,
                         tokens=jnp.full((b, self.max_new_tokens + g + 1), pad_id, jnp.int32).at[:, 0].set(first),
                         num_generated=jnp.ones((b,), jnp.int32),
                         done=jnp.isin(first, self.stops) | (self.max_new_tokens <= 1) | ~finite,
                         rounds=jnp.zeros((b,), jnp.int32), stats=RoundStats.zeros(b, self.max_new_tokens, g),
                         nonfinite=~finite, plain_left=jnp.int32(0), backoff=jnp.int32(1),
                         stale_confidence=jnp.full((b, g), -1.0, jnp.float32),
                         progress=jnp.zeros((2,), jnp.float32), declined=jnp.int32(0))

    def step(self, c: SpecState) -> SpecState:
        """One drafted round, then — with the gate on — the plain rounds it scheduled. A round drafts only when
        the last drafted round expected drafting to beat a plain round (expected progress of the slowest request
        per second, `draft_length.bucket_rates`); after a losing drafted round the next 1, 2, 4, … (≤
        MAX_PLAIN_RUN) rounds are plain. The decision reads only earlier rounds, so it keeps the loop lossless.
        Plain rounds run in their own inner loop (`plain_run`), not as a branch of a conditional: a buffer that
        more than one branch of a conditional updates is copied, and the KV cache is the loop's largest. The
        drafted round's branches (one per bucket) only read the cache; its rows are written after them
        (`_apply`)."""
        c = self._apply(c, self.drafted(c))
        return self.plain_run(c) if self.gate else c

    def plain_run(self, c: SpecState) -> SpecState:
        """Plain rounds while the gate's plain_left > 0 and a request is active."""
        return jax.lax.while_loop(lambda s: (s.plain_left > 0) & ~jnp.all(s.done), self.plain, c)

    def forced_rounds(self, c: SpecState, choice: jax.Array, num_rounds: jax.Array) -> SpecState:
        """num_rounds rounds at a given bucket index (choice >= 0), or plain rounds (choice < 0): for profiling."""
        drafted = lambda s: jax.lax.fori_loop(  # noqa: E731
            0, num_rounds, lambda _, x: self._apply(x, self.drafted(x, jnp.maximum(choice, 0))), s)
        plain = lambda s: jax.lax.fori_loop(0, num_rounds, lambda _, x: self.plain(x), s)  # noqa: E731
        return jax.lax.cond(choice < 0, plain, drafted, c)

    def drafted(self, c: SpecState, choice: jax.Array | None = None) -> _Outcome:
        """Propose, choose the bucket (`choice` given: that bucket index), verify. With the gate on, a round that
        would verify no draft (the anchors' bucket), does not pay and ran no drafter model's forward is declined:
        nothing is verified or committed — the plain rounds the gate schedules next commit the tokens, each at a
        plain round's cost, where the verification of the anchors alone cost more (a hybrid's lookup-only round at
        batch 8: 49.5 against 45.5 ms, BENCHMARKS.md "Session 54") and taught the drafter nothing. A round that ran a model's forward is verified
        (its commit is the model's record of that forward: `drafters.hybrid`)."""
        target, drafter = self.target, self.drafter
        b, g = c.anchor.shape[0], drafter.config.block_size
        active = ~c.done
        remaining = self.max_new_tokens - c.num_generated
        k_draft = position_keys(c.keys, c.start, DRAFT)
        scale = self.progress_scale(c)
        priced = ({} if self.lookup_costs is None or not hasattr(drafter.config, "price_model")
                  else dict(model_pays=self.model_pays(active, remaining, scale)))  # a hybrid with both cost tables
        prop = drafter.propose(target, c.drafter_state, c.anchor, c.start, k_draft, self.params, self.mode,
                               self.head, **priced)
        n_prop = self.proposed(prop.confidence, prop.num_drafted, active)

        def at_bucket(bucket):  # a round verifying `bucket` rows: anchors + the drafts worth most
            def run():
                rows = per_request_rows(b, g, bucket)
                verified = verified_drafts(prop.confidence, n_prop, active, remaining, bucket,
                                           take_all=self.costs is None, objective=self.objective)
                return self._verify(c, _first_drafts(prop, rows - 1), verified, bucket, rows), verified
            return run

        plain_left, backoff = c.plain_left, c.backoff
        declined, forced = jnp.bool_(False), choice is not None
        if choice is None:
            sampled = (self.params.temperature > 0) & ~_deterministic_rows(prop, b)
            conf = budget_confidence(prop.confidence, c.stale_confidence, sampled)
            if self.gate:  # the choice as `choose_bucket`'s, and whether it beats a plain round
                choice, pays = gated_choice(conf, n_prop, active, remaining, self.buckets, self.round_costs(prop),
                                            self.plain_cost, self.objective, scale)
                plain_left = jnp.where(pays, 0, backoff).astype(jnp.int32)
                backoff = jnp.where(pays, 1, jnp.minimum(2 * backoff, MAX_PLAIN_RUN)).astype(jnp.int32)
                declined = ~pays & (choice == 0) & ~jnp.any(_model_forward(prop, b) & active)
            else:
                choice = choose_bucket(conf, n_prop, active, remaining, self.buckets, self.round_costs(prop),
                                       self.objective, scale)
        branches = [at_bucket(t) for t in self.buckets]
        if self.gate and not forced:  # the declined round's branch, only where a round can be declined
            choice = jnp.where(declined, len(branches), choice)
            branches.append(self._declined_round(c, branches[0]))
        res, verified = jax.lax.switch(choice, branches)
        # the model rows' confidences (deterministic rows read fresh ones: `budget_confidence`)
        stale = jnp.where((active & ~_deterministic_rows(prop, b))[:, None], prop.confidence, c.stale_confidence)
        # read only by later rounds (the progress record), so the fresh confidences serve, as for `stale`
        expected = slack_of(active, remaining) + expected_committed(prop.confidence, verified, remaining)
        return _Outcome(res, verified, prop.confidence, prop.confidence_logits, _model_forward(prop, b),
                        _deterministic_rows(prop, b), _lookup_expected(prop, b), plain_left, backoff, stale,
                        expected, declined)

    @staticmethod
    def _declined_round(c: SpecState, verified_round):
        """A branch shaped like `verified_round`'s (a round of the `drafted` switch) that verifies and commits
        nothing: no token, no K/V row, the drafter's state unchanged."""
        def run():
            res, verified = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(verified_round))
            kv = None if res.kv_rows is None else dataclasses.replace(res.kv_rows,
                                                                     position=jnp.full_like(res.kv_rows.position, -1))
            return dataclasses.replace(res, anchor=c.anchor, drafter_state=c.drafter_state, kv_rows=kv), verified
        return run

    def plain(self, c: SpecState) -> SpecState:
        """A plain round (the drafter's propose skipped): plain decoding's step (`decoding.autoregressive`) —
        one token per active request from the target's distribution, drawn with plain decoding's key stream
        (`sampling.keys.SAMPLE`) at its position, the cache written in place — then the loop's bookkeeping; the
        drafter receives the position's features and token."""
        target, drafter = self.target, self.drafter
        g, b = drafter.config.block_size, c.anchor.shape[0]
        active = ~c.done
        out = target(c.anchor[:, None], c.start[:, None], c.target_cache, c.start,
                     tap_layers=drafter.config.target_layer_ids)
        logits = target.logits(out.hidden[:, 0])
        nxt, finite = sample_checked(position_keys(c.keys, c.start, SAMPLE), logits, self.params, self.mode)
        count = (active & finite).astype(jnp.int32)
        drafter_state = drafter.commit(target, c.drafter_state, concat_taps(out.taps), c.anchor[:, None], c.start,
                                       count)
        none = jnp.zeros((b,), jnp.int32)
        res = RoundResult(committed=jnp.zeros((b, g + 1), jnp.int32).at[:, 0].set(nxt), count=count,
                          num_accepted=none, accept_flags=jnp.zeros((b, g), bool),
                          stopped=jnp.isin(nxt, self.stops) & (count > 0), anchor=jnp.where(count > 0, nxt, c.anchor),
                          target_cache=out.cache, drafter_state=drafter_state, nonfinite=active & ~finite)
        no_conf = jnp.zeros((b, g), jnp.float32)
        c = dataclasses.replace(c, target_cache=out.cache, plain_left=c.plain_left - 1)
        no = jnp.zeros((b,), bool)
        return self._commit(c, res, none, no_conf, no_conf, no, no, jnp.zeros((b,), jnp.float32))

    def _verify(self, c: SpecState, proposal: Proposal, num_verify: jax.Array, bucket: int, rows: int):
        """`verify_round` of num_verify[b] drafts per active request, laid out flat in `bucket` rows (at most
        `rows` per request; finished requests take none — unless the bucket is the full grid, bucket = B · rows:
        then every request keeps its rows in a static layout, the dense layout of the loop before flat buckets),
        its per-slot outputs padded to G + 1 / G slots and its K/V rows (not yet written) to G + 1 (one shape
        for every bucket)."""
        g, b = self.drafter.config.block_size, c.anchor.shape[0]
        if bucket == b * rows:  # every request takes `rows` rows (batch 1, plain rounds, the largest bucket)
            layout = dense_layout(b, rows, c.start)
        else:
            layout = make_layout(jnp.where(c.done, 0, num_verify + 1), c.start, bucket, rows)
        r = verify_round(self.target, self.drafter, c.target_cache, c.drafter_state, proposal, c.anchor, c.start,
                         num_verify, ~c.done, self.max_new_tokens - c.num_generated, layout,
                         position_keys(c.keys, c.start, VERIFY), self.params, self.mode, self.stops,
                         write_cache=False)
        return dataclasses.replace(r, committed=_pad_slots(r.committed, g + 1),
                                   accept_flags=_pad_slots(r.accept_flags, g), kv_rows=r.kv_rows.padded(g + 1))

    def _apply(self, c: SpecState, o: _Outcome) -> SpecState:
        """Writes a round's outcome into the state: its K/V rows into the target cache, the gate's state
        (`_gate_state`), tokens and statistics."""
        c = dataclasses.replace(self._gate_state(c, o), target_cache=o.res.kv_rows.write(c.target_cache))
        return self._commit(c, o.res, o.verified, o.confidence, o.confidence_logits, o.model_forward, o.lookup_draft,
                            o.lookup_expected, counted=~jnp.asarray(o.declined))

    def _gate_state(self, c: SpecState, o: _Outcome) -> SpecState:
        """The gate's state after a drafted round: plain_left, backoff, stale_confidence, and the progress record
        (`progress_scale`): the round's realized progress of the longest remaining request — min over the
        requests still to finish of slack + committed tokens (`draft_length.fluid_gain` with the committed counts
        for the expected ones) — beyond a plain round's 1, against the expected one over the same requests
        (`_Outcome.expected`): a request that stopped this round (a stop token, non-finite logits) holds nothing
        back and counts on neither side. A round whose every request stopped adds nothing, nor does a declined
        round (`drafted`), counted in `declined`."""
        active = ~c.done
        remaining = self.max_new_tokens - c.num_generated
        staying = active & ~o.res.stopped & ~o.res.nonfinite
        realized = jnp.min(jnp.where(staying, slack_of(active, remaining) + o.res.count, jnp.inf))
        expected = jnp.min(jnp.where(staying, o.expected, jnp.inf))
        declined = jnp.asarray(o.declined)
        gained = jnp.where(staying.any() & ~declined, jnp.stack([realized, expected]).astype(jnp.float32) - 1.0, 0.0)
        return dataclasses.replace(c, plain_left=o.plain_left, backoff=o.backoff, stale_confidence=o.stale_confidence,
                                   progress=c.progress + gained, declined=c.declined + declined.astype(jnp.int32))

    def _commit(self, c: SpecState, res, n_prop: jax.Array, confidence: jax.Array,
                confidence_logits: jax.Array, model_forward: jax.Array, lookup_draft: jax.Array,
                lookup_expected: jax.Array, counted: jax.Array | bool = True) -> SpecState:
        """Writes the round's committed tokens and statistics into the state (the target cache: `_apply`). A round
        not `counted` (declined: it commits nothing) adds no round and no statistics."""
        g = self.drafter.config.block_size
        b = c.anchor.shape[0]
        active = ~c.done & counted
        count = res.count
        finished = res.stopped | (c.num_generated + count >= self.max_new_tokens) | res.nonfinite
        write = jax.vmap(lambda row, new, s: jax.lax.dynamic_update_slice(row, new, (s,)))
        keep = jnp.arange(g + 1)[None] < count[:, None]
        old = jax.vmap(lambda row, s: jax.lax.dynamic_slice(row, (s,), (g + 1,)))(c.tokens, c.num_generated)
        tokens = write(c.tokens, jnp.where(keep, res.committed, old), c.num_generated)

        rows, slot = jnp.arange(b), jnp.minimum(c.rounds, self.max_new_tokens - 1)

        def record(arr, val):  # this round's value in each active request's round slot
            cur = arr[rows, slot]
            return arr.at[rows, slot].set(jnp.where(active.reshape((b,) + (1,) * (val.ndim - 1)), val, cur))

        st = c.stats
        stats = RoundStats(proposed=record(st.proposed, n_prop), accepted=record(st.accepted, res.num_accepted),
                           committed=record(st.committed, count),
                           accept_flags=record(st.accept_flags, res.accept_flags),
                           confidence=record(st.confidence, confidence),
                           confidence_logits=record(st.confidence_logits, confidence_logits),
                           model_forward=record(st.model_forward, model_forward),
                           lookup_draft=record(st.lookup_draft, lookup_draft),
                           lookup_expected=record(st.lookup_expected, lookup_expected))
        return dataclasses.replace(c, anchor=res.anchor, start=c.start + count,
                                   drafter_state=res.drafter_state, tokens=tokens,
                                   num_generated=c.num_generated + count, done=c.done | finished,
                                   rounds=c.rounds + active.astype(jnp.int32), stats=stats,
                                   nonfinite=c.nonfinite | res.nonfinite)


@functools.partial(jax.jit, static_argnames=("target_graphdef", "drafter_graphdef"))
def draft_head(target_graphdef: nnx.GraphDef, target_state: nnx.State, drafter_graphdef: nnx.GraphDef,
               drafter_state: nnx.State) -> HeadRows | jax.Array | None:
    """The drafter's output-embedding rows [N, d] (`head_rows`: the target's embedding rows of the draft
    vocabulary, a `models.output_head.HeadRows` with the rows' int8 blocks where the target's head reads them
    through the CPU kernel; None for lookup), for a caller that decodes many batches
    (`generation.decode_batches`) or serves (`serving.engine`) to gather once and pass to every call."""
    return nnx.merge(drafter_graphdef, drafter_state).head_rows(nnx.merge(target_graphdef, target_state))


def _rounds(target_graphdef, target_state, drafter_graphdef, drafter_state, params, confidence_threshold, *,
            batch, max_new_tokens, stop_ids, mode, verify_buckets, verify_costs, plain_cost, lookup_costs=None,
            progress_prior=None, head=None) -> _Rounds:
    """The static round context of one call, with the bucket / cost settings checked (head: `draft_head`'s
    output, None: gathered here)."""
    target = nnx.merge(target_graphdef, target_state)
    drafter = nnx.merge(drafter_graphdef, drafter_state)
    if head is None:
        head = drafter.head_rows(target)
    else:
        expected, given = describe_tree(jax.eval_shape(drafter.head_rows, target)), describe_tree(head)
        if expected != given:
            raise ValueError(f"head must be this drafter's draft_head output {expected}, got {given}")
    g = drafter.config.block_size
    buckets = tuple(verify_buckets or (batch, batch * (g + 1)))
    if list(buckets) != sorted(set(buckets)) or buckets[0] != batch or buckets[-1] > batch * (g + 1):
        raise ValueError(f"verify_buckets must increase from the batch size {batch} to at most batch·(G + 1) = "
                         f"{batch * (g + 1)} rows, got {buckets}")
    if verify_costs is not None and len(verify_costs) != len(buckets):
        raise ValueError(f"one verify cost per bucket needed: {len(buckets)} buckets, {len(verify_costs)} costs")
    if plain_cost is not None and not (verify_costs is not None and plain_cost > 0):
        raise ValueError(f"plain_cost needs verify_costs and must be > 0, got {plain_cost}")
    if progress_prior is not None and not progress_prior > 0:
        raise ValueError(f"progress_prior must be > 0 (None: no correction), got {progress_prior}")
    if lookup_costs is not None and (verify_costs is None or len(lookup_costs) != len(buckets)):
        raise ValueError(f"lookup_costs need verify_costs and one cost per bucket: {len(buckets)} buckets, "
                         f"{len(lookup_costs)} lookup costs")
    return _Rounds(target=target, drafter=drafter, head=head, params=params, mode=mode,
                   stops=jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32), threshold=confidence_threshold,
                   max_new_tokens=max_new_tokens, buckets=buckets, costs=verify_costs,
                   plain_cost=plain_cost, lookup_costs=lookup_costs, progress_prior=progress_prior)


@functools.partial(jax.jit, static_argnames=_STATIC)
def speculative_generate(target_graphdef: nnx.GraphDef, target_state: nnx.State, drafter_graphdef: nnx.GraphDef,
                         drafter_state: nnx.State, prompts: jax.Array, prompt_lens: jax.Array, key: jax.Array,
                         params: SamplingParams, confidence_threshold: jax.Array, *, max_new_tokens: int,
                         stop_ids: tuple[int, ...], mode: FilterMode = FilterMode(), pad_id: int = 0,
                         verify_buckets: tuple[int, ...] | None = None,
                         verify_costs: tuple[float, ...] | None = None, plain_cost: float | None = None,
                         lookup_costs: tuple[float, ...] | None = None, progress_prior: float | None = None,
                         head: HeadRows | jax.Array | None = None) -> SpecOutput:
    """Lossless speculative decoding of right-padded prompts [B, P] (lengths [B]); exactly
    `max_new_tokens` per request, or fewer up to and including a stop token. key: one per request [B] or one
    for the batch (`sampling.keys`).

    Each round verifies one flat bucket of rows (`models.layout`) out of `verify_buckets` (ascending, from B to
    at most B·(G + 1); default (B, B·(G + 1)): a round where nothing was drafted is a plain step), each compiled
    once: every active request's anchor plus its drafts, finished requests none. Without `verify_costs` a round
    takes the smallest bucket holding every proposal (drafts of the slowest requests first when none does);
    with them (one per bucket: seconds of a whole round, `round_costs.profile_round_costs`) the bucket that
    shortens the longest remaining request the most per second, its drafts given to the requests furthest behind
    (`decoding.draft_length`, hardware-aware draft length; at batch 1: the most expected committed tokens per
    second). At batch 1 a bucket is the verification width.
    With `plain_cost` too (seconds of a round without a proposal), rounds skip the drafter while drafting is
    expected to lose to plain decoding (`_Rounds.step`). With `lookup_costs` too (a hybrid drafter's rounds
    that skip its model's forward, per bucket), such rounds are priced by them (`_Rounds.round_costs`), and a
    hybrid with `price_model` skips its model's forward where it is not expected to pay (`_Rounds.model_pays`).
    With `progress_prior` (> 0, tokens) the rates trust the objective's expected progress only as far as the
    batch's earlier drafted rounds realized it (`_Rounds.progress_scale`).
    head: the drafter's output-embedding rows from `draft_head` (a caller decoding many batches gathers them
    once); None: gathered in the call.
    Raises ValueError on inconsistent buckets / costs, or a head of another structure, shape or dtype than
    `draft_head`'s."""
    check_batch(prompts, prompt_lens, params)
    rounds = _rounds(target_graphdef, target_state, drafter_graphdef, drafter_state, params, confidence_threshold,
                     batch=prompts.shape[0], max_new_tokens=max_new_tokens, stop_ids=stop_ids, mode=mode,
                     verify_buckets=verify_buckets, verify_costs=verify_costs, plain_cost=plain_cost,
                     lookup_costs=lookup_costs, progress_prior=progress_prior, head=head)
    state = rounds.start(prompts, prompt_lens, key, pad_id)
    final = jax.lax.while_loop(lambda c: ~jnp.all(c.done), rounds.step, state)
    return SpecOutput(tokens=final.tokens[:, :max_new_tokens], num_tokens=final.num_generated, rounds=final.rounds,
                      nonfinite=final.nonfinite, declined_rounds=final.declined, **vars(final.stats))


@functools.partial(jax.jit, static_argnames=_STATIC)
def speculative_start(target_graphdef: nnx.GraphDef, target_state: nnx.State, drafter_graphdef: nnx.GraphDef,
                      drafter_state: nnx.State, prompts: jax.Array, prompt_lens: jax.Array, key: jax.Array,
                      params: SamplingParams, confidence_threshold: jax.Array, *, max_new_tokens: int,
                      stop_ids: tuple[int, ...], mode: FilterMode = FilterMode(), pad_id: int = 0,
                      verify_buckets: tuple[int, ...] | None = None, verify_costs: tuple[float, ...] | None = None,
                      plain_cost: float | None = None, lookup_costs: tuple[float, ...] | None = None,
                      progress_prior: float | None = None) -> SpecState:
    """The loop's state after the prefill (`speculative_generate`'s first step, same arguments): the start of
    `speculative_rounds`."""
    check_batch(prompts, prompt_lens, params)
    rounds = _rounds(target_graphdef, target_state, drafter_graphdef, drafter_state, params, confidence_threshold,
                     batch=prompts.shape[0], max_new_tokens=max_new_tokens, stop_ids=stop_ids, mode=mode,
                     verify_buckets=verify_buckets, verify_costs=verify_costs, plain_cost=plain_cost,
                     lookup_costs=lookup_costs, progress_prior=progress_prior)
    return rounds.start(prompts, prompt_lens, key, pad_id)


@functools.partial(jax.jit, static_argnames=("target_graphdef", "drafter_graphdef", "max_new_tokens", "stop_ids",
                                                   "mode", "verify_buckets"))
def speculative_rounds(target_graphdef: nnx.GraphDef, target_state: nnx.State, drafter_graphdef: nnx.GraphDef,
                       drafter_state: nnx.State, state: SpecState, params: SamplingParams,
                       confidence_threshold: jax.Array, choice: jax.Array, num_rounds: jax.Array, *,
                       max_new_tokens: int, stop_ids: tuple[int, ...], mode: FilterMode = FilterMode(),
                       verify_buckets: tuple[int, ...] | None = None) -> SpecState:
    """Exactly `num_rounds` (traced: one compilation for any count) rounds of the loop's round code from `state`
    (`speculative_start`, same static arguments) at bucket index `choice` (traced; < 0: plain rounds), finished
    requests included — what the round-cost profile (`round_costs`) times, without the prefill."""
    rounds = _rounds(target_graphdef, target_state, drafter_graphdef, drafter_state, params, confidence_threshold,
                     batch=state.anchor.shape[0], max_new_tokens=max_new_tokens, stop_ids=stop_ids, mode=mode,
                     verify_buckets=verify_buckets, verify_costs=None, plain_cost=None)
    return rounds.forced_rounds(state, choice, num_rounds)

"""A trained drafter and prompt lookup together (`--drafter default+ngram`): each round, per request, both
propose and the one with the larger expected accepted length Σ_k Π_{i≤k} c_i is verified — the trained
drafter's calibrated confidence head against the lookup's online acceptance estimates.

The choice uses only what is known before any of the round's drafts is verified and never depends on a
sampled draft token itself, so verification stays lossless: at T > 0 the model's drafts are sampled and, with
a Markov head, c_k depends on x_{k−1}, so the model's side is scored from c_1 and, past it, the request's
predicted conditional confidences from its earlier rounds (`predicted_model_confidence`; choosing whether to
verify x_1 from this round's c_2.. would bias x_1's acceptance — DSpark Appendix A). Scoring the later positions
by c_1 too (Σ_k c_1^k, before session 41) under-promised where a match makes the model's later drafts likely: at
T = 1 the hybrid lost to its model alone (τ 1.35 vs 1.43 macro, BENCHMARKS.md "Session 41"). Greedy drafts are
functions of the past and use every c_k. A chosen lookup row is verified as a deterministic draft (one-hot p_d), a
chosen model row with the model's p_d. Both drafters see every committed token, whichever was chosen.

Each side's confidences are corrected by its own record in this request, as the lookup's already are
(`drafters.ngram.lookup_confidence`): the model's c_k becomes (accepted_k + s·c_k) / (tested_k + s), its
calibrated head worth s observations (`model_prior_strength`), moved by how often position k of its verified
drafts was accepted in this request's earlier rounds. A head calibrated on the training distribution can
over-promise on a request unlike it (code it has not seen, where lookup is the better bet); the record reads
only earlier rounds, so the choice stays lossless. The record is per source: a failed model draft does not lower
the trust in the lookup's (a per-request factor on both did, session 9, BENCHMARKS.md). The lookup's record learns
from every verification round, also where the model's draft was verified (its proposal is compared with the
committed tokens, `NgramDrafter.commit`); the model's only from rounds that verified its draft (sampled drafts:
whether an unverified one would have been accepted is not known).

A request whose lookup draft is expected to accept at least `skip_model_at` tokens (default 1) takes it, whatever
the model's score, and the model's forward is skipped in a round where every request does: the lookup draft is
free and the model's forward is not (5–18 % of a plain step of the embedded 270M target at batch 1 on a 2-core
CPU), and where lookup has a match its draft is the better bet on held-out prompts — with the default 1 instead
of 0.6·γ (the default before session 21) the main job at T = 0, batch 1, gained on every set: humaneval 2.09x →
2.27x, τ 4.52 → 4.78 (BENCHMARKS.md "Session 21"). Per request, so a request's choice does not depend on what
shares its batch (before session 22 a request whose companions needed the model could take the model's draft
over a lookup match). The rule reads only the lookup proposal, known before verification. `skip_model_at` 0:
the model's forward never runs (lookup alone, with the hybrid's state); inf: it runs in every round — the two
kinds of round a cost profile times (`round_costs`). A round's proposal says which kind it was
(`Proposal.model_skipped`), so the loop prices a round without the model's forward by its own, cheaper costs.

The model's forward is priced too (`price_model`, default on; session 32): with the loop's round costs (a
profile with and without the forward, `round_costs`) the loop hands `propose` a test `model_pays`, and the
forward is also skipped where the round it makes possible is not expected to progress faster per second than a
lookup-only round. The model's drafts of a round not yet run are predicted per request from its earlier rounds:
the mean of its head's confidences over the request's model rounds, corrected by its record as above
(`predicted_model_confidence`); a request whose model never ran is predicted to accept everything (the forward
runs and the prediction starts). At batch 8 a round with the 15-token model's forward costs 1.48–1.69x a plain
round, without it 1.00–1.24x (BENCHMARKS.md "Session 31"): a forward run for requests whose model drafts rarely
pass costs more than they bring, in drafted rounds and in the gate's probes alike. The test reads only the
lookup's proposal and earlier rounds, so the choice stays lossless. A request whose model is priced out keeps its
prediction (it changes only in rounds that run the model); the model runs again when the lookup's side or the
tokens left change the comparison. Without `lookup_costs` (a fixed draft length) and in the serving engine nothing
is priced.

`model_draft_length` (default 6; None, or in a spec any length >= γ: the whole block) lets the model draft only the first
tokens of the block while the lookup drafts all of it: the model's forward then runs a shorter block (its proposal is
padded with confidence-0, never-verified positions). Its cost grows with batch × block rows: the shipped drafter's
propose at batch 8 takes 56 ms for a 15-token block and 21 ms for 4, against an 80 ms plain round, on a 2-core CPU.
At batch 1 on the same CPU, with the target reading its int8 blocks, a round with the model's 15-token forward costs
1.59x a plain round and one with a 6-token forward 1.34x, while the rounds that verified a model draft verified 3
or 4 of its drafts (39 of 42 such rounds over the four held-out sets' first 8 prompts; 7 in the other 3): the default
6 made the main job 1.54x → 1.59x plain decoding macro over those sets, side by side (BENCHMARKS.md "Session 51"; at
batch 8 session 48 measured 4 against the whole block: within 2 %). Measured on CPUs only: where
verification is cheap (a GPU) longer model drafts may be verified, and None restores the whole block.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.drafters.base import Proposal, RoundOutcome
from dspark_jax.drafters.hybrid_calibration import FEATURES as ROW_FEATURES
from dspark_jax.drafters.hybrid_calibration import calibrated_rows
from dspark_jax.drafters.ngram import NgramDrafter, acceptance_counts, record_confidence


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """block_size (γ, both drafters'); target_layer_ids: the model drafter's taps; algorithm "<model>+ngram"."""
    block_size: int
    target_layer_ids: tuple[int, ...]
    algorithm: str
    confidence_head: bool = True  # each row's confidence: the model's head or the lookup's estimates
    skip_model_at: float = 1.0  # a lookup draft expecting this many accepted tokens is taken (module doc); inf: never,
    # 0: always (the model's forward never runs)
    model_prior_strength: float = 4.0  # observations the model's head is worth against its record (module doc)
    price_model: bool = True  # skip the model's forward where the loop's costs say it does not pay (module doc)
    row_calibration: tuple[float, ...] | None = None  # weights mapping each verified row's confidences
    # (`drafters.hybrid_calibration`; fitted on the hybrid's rounds, kept in the model drafter's directory); None: off
    model_draft_length: int | None = 6  # the model drafts at most this many of the block's tokens (module doc);
    # None: the whole block


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridState:
    """The two drafters' states and the model's record: model_tested / model_accepted [B, G], per request and
    draft position, how often a verified model draft reached position k with every earlier one accepted, and
    how often it was then accepted (None: no record — the head's confidences as they are); model_confidence_sum
    [B, G] and model_rounds [B]: the sum of the model head's confidences over the request's rounds that ran the
    model, and their number (`HybridDrafter.predicted_model_confidence`)."""
    model: object
    lookup: object
    model_tested: jax.Array | None = None
    model_accepted: jax.Array | None = None
    model_confidence_sum: jax.Array | None = None
    model_rounds: jax.Array | None = None


class HybridDrafter(nnx.Module):
    """`model` (DSpark, DFlash or Eagle3) + `lookup` (an `NgramDrafter` of the same block size)."""

    def __init__(self, model, lookup: NgramDrafter, skip_model_at: float = HybridConfig.skip_model_at,
                 model_prior_strength: float = HybridConfig.model_prior_strength,
                 price_model: bool = HybridConfig.price_model,
                 row_calibration: tuple[float, ...] | None = HybridConfig.row_calibration,
                 model_draft_length: int | None = HybridConfig.model_draft_length):
        if model.config.block_size != lookup.config.block_size:
            raise ValueError(f"hybrid drafters need one block size, got {model.config.block_size} (model) and "
                             f"{lookup.config.block_size} (lookup)")
        self.model, self.lookup = model, lookup
        self.model_block_limit = model.config.block_size  # the model's block as loaded: the longest γ it drafts
        if not skip_model_at >= 0:
            raise ValueError(f"skip_model_at must be >= 0 (0: never run the model, inf: never skip it), got "
                             f"{skip_model_at}")
        if not model_prior_strength > 0:
            raise ValueError(f"model_prior_strength must be > 0, got {model_prior_strength}")
        if row_calibration is not None and len(row_calibration) != len(ROW_FEATURES):
            raise ValueError(f"row_calibration has {len(ROW_FEATURES)} weights ({', '.join(ROW_FEATURES)}), got "
                             f"{len(row_calibration)}")
        self.config = HybridConfig(model.config.block_size, tuple(model.config.target_layer_ids),
                                   f"{model.config.algorithm}+ngram", skip_model_at=skip_model_at,
                                   model_prior_strength=model_prior_strength, price_model=bool(price_model),
                                   row_calibration=None if row_calibration is None
                                   else tuple(float(w) for w in row_calibration),
                                   model_draft_length=None)
        self.set_model_draft_length(model_draft_length)

    @property
    def model_skip_threshold(self) -> float:
        """Expected accepted lookup drafts at or above which a request takes the lookup's draft (and a round in
        which every request does skips the model's forward)."""
        return float(self.config.skip_model_at)

    def set_block_size(self, gamma: int) -> None:
        """Propose `gamma` tokens (at most the model's block as loaded, `model_block_limit`); the model drafts the
        first `model_draft_length` of them where that is shorter."""
        if not 1 <= gamma <= self.model_block_limit:
            raise ValueError(f"gamma must be in [1, {self.model_block_limit}] for this drafter (trained with block "
                             f"size {self.model_block_limit}), got {gamma}")
        self.model.config = dataclasses.replace(self.model.config, block_size=self.model_block(gamma))
        self.lookup.config = dataclasses.replace(self.lookup.config, block_size=gamma)
        self.config = dataclasses.replace(self.config, block_size=gamma)

    def set_model_draft_length(self, length: int | None) -> None:
        """The model drafts the block's first `length` tokens from now on (None: the whole block)."""
        if length is not None and not 1 <= length:
            raise ValueError(f"model_draft_length must be >= 1 (None: the whole block), got {length}")
        self.config = dataclasses.replace(self.config, model_draft_length=length)
        self.set_block_size(self.config.block_size)

    def model_block(self, gamma: int | None = None) -> int:
        """Tokens the model drafts in a block of `gamma` (default: the hybrid's block size)."""
        gamma = self.config.block_size if gamma is None else gamma
        return min(gamma, self.config.model_draft_length or gamma)

    # the model drafter's vocabulary is the one its p_draft rows live in
    @property
    def full_vocab(self) -> bool:
        return self.model.full_vocab

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def draft_to_target(self):
        return self.model.draft_to_target

    def head_matrix(self, target_model):
        return self.model.head_matrix(target_model)

    def head_rows(self, target_model):
        return self.model.head_rows(target_model)

    def init_state(self, batch: int, max_len: int) -> HybridState:
        shape = (batch, self.config.block_size)  # distinct buffers: engines donate leaf by leaf
        return HybridState(self.model.init_state(batch, max_len), self.lookup.init_state(batch, max_len),
                           jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32),
                           jnp.zeros((batch,), jnp.float32))

    def prefill(self, target_model, state: HybridState, features, prompts, prompt_lens) -> HybridState:
        return dataclasses.replace(
            state, model=self.model.prefill(target_model, state.model, features, prompts, prompt_lens),
            lookup=self.lookup.prefill(target_model, state.lookup, features, prompts, prompt_lens))

    def commit(self, target_model, state: HybridState, features, verified, start, count,
               outcome: RoundOutcome | None = None) -> HybridState:
        """Both drafters commit (`verified`, `start`, `count`, `outcome` as theirs: the lookup's record compares
        its proposal with the committed tokens, whichever draft was verified). With a verification round's
        `outcome` the model's record counts the rows whose model draft was verified (outcome.deterministic
        False; the model's drafts are sampled at T > 0, so their acceptance is only known where verified), and
        the prediction's sums count the model head's confidences of every committing request in a round that ran
        the model (`outcome.model_confidence`)."""
        new = dataclasses.replace(
            state, model=self.model.commit(target_model, state.model, features, verified, start, count, outcome),
            lookup=self.lookup.commit(target_model, state.lookup, features, verified, start, count, outcome))
        if outcome is not None and outcome.model_confidence is not None and state.model_rounds is not None:
            ran = count > 0  # the model's confidences of the request's rounds that ran its forward
            if outcome.model_skipped is not None:
                ran = ran & ~outcome.model_skipped
            g = state.model_confidence_sum.shape[1]
            new = dataclasses.replace(
                new, model_confidence_sum=state.model_confidence_sum + jnp.where(
                    ran[:, None], outcome.model_confidence[:, :g].astype(jnp.float32), 0.0),
                model_rounds=state.model_rounds + ran.astype(jnp.float32))
        if outcome is None or outcome.deterministic is None or state.model_tested is None:
            return new
        nv = outcome.num_verified
        limit = jnp.where(outcome.deterministic, 0, nv)  # model rows: their verified drafts
        tested, ok = acceptance_counts(jnp.clip(count - 1, 0, nv), limit, state.model_tested.shape[1])
        return dataclasses.replace(new, model_tested=state.model_tested + tested,
                                   model_accepted=state.model_accepted + ok)

    def model_confidence(self, state: HybridState, confidence: jax.Array) -> jax.Array:
        """[B, G] the model head's confidences corrected by the request's record (module docstring)."""
        if state.model_tested is None:
            return confidence
        g = confidence.shape[1]
        return record_confidence(state.model_accepted[:, :g], state.model_tested[:, :g], confidence,
                                 self.config.model_prior_strength)

    def predicted_model_confidence(self, state: HybridState) -> jax.Array:
        """[B, G] the model's confidences expected in a round not yet run: the mean of its head's confidences
        over the request's rounds that ran it, corrected by its record (`model_confidence`); 1 for a request whose
        model never ran (module docstring)."""
        rounds = state.model_rounds[:, None]
        mean = state.model_confidence_sum / jnp.maximum(rounds, 1.0)
        return jnp.where(rounds > 0, self.model_confidence(state, mean), 1.0)

    def skips_model(self, by_lookup: Proposal) -> jax.Array:
        """Scalar bool: the `skip_model_at` rule — every request's lookup draft expects at least `skip_model_at`
        accepted tokens (module docstring; `propose` may also skip by price). Reads only the lookup's proposal."""
        return jnp.all(by_lookup.expected_accept_length >= self.model_skip_threshold)

    def takes_lookup(self, lookup_expects: jax.Array, model_expects: jax.Array) -> jax.Array:
        """[B] bool: requests whose lookup draft is taken — it expects at least `skip_model_at` accepted tokens,
        or more than the model's draft (`model_score`). lookup_expects, model_expects [B] expected accepted lengths."""
        return (lookup_expects >= self.model_skip_threshold) | (lookup_expects > model_expects)

    def model_expects(self, state: HybridState, by_model: Proposal, params) -> jax.Array:
        """[B] the model draft's expected accepted length for the choice (`model_score`; sampled rows read the
        request's predicted confidences past c_1, `predicted_model_confidence`, where the state keeps them)."""
        later = None if state.model_rounds is None else self.predicted_model_confidence(state)
        return model_score(by_model, params, later)

    def predicted_rows(self, state: HybridState, by_lookup: Proposal, params) -> tuple[jax.Array, jax.Array]:
        """What a round that runs the model is expected to verify, before it runs: per request the lookup's row
        where it would be taken against the model's predicted draft (`predicted_model_confidence`, scored as
        `model_score` scores a sampled row: the prediction at every position), else the model's predicted one —
        (confidence [B, G], drafted tokens [B])."""
        g, drafts = by_lookup.tokens.shape[1], self.model.config.block_size  # the model drafts the first `drafts`
        predicted = jnp.where(jnp.arange(g)[None] < drafts, self.predicted_model_confidence(state)[:, :g], 0.0)
        stand_in = dataclasses.replace(by_lookup, confidence=predicted, length=None)
        takes_lookup = self.takes_lookup(by_lookup.expected_accept_length, stand_in.expected_accept_length)
        return (jnp.where(takes_lookup[:, None], by_lookup.confidence, predicted),
                jnp.where(takes_lookup, by_lookup.num_drafted, drafts).astype(jnp.int32))

    def propose(self, target_model, state: HybridState, anchor, start, key, params, mode, head,
                model_pays=None) -> Proposal:
        """Both drafters' proposals, one row chosen per request (module docstring). model_pays (optional, the
        loop's, with its round costs): f(lookup confidence [B, G], lookup drafted [B], predicted confidence
        [B, G], predicted drafted [B]) → scalar bool, whether the round the model's forward makes possible
        (`predicted_rows`) is expected to beat a lookup-only round; where it is not, the forward is skipped
        (with `price_model`)."""
        by_lookup = self.lookup.propose(target_model, state.lookup, anchor, start, key, params, mode, head)

        def model_proposal():  # confidences corrected by the record here: a skipped model keeps confidence 0
            prop = padded_proposal(self.model.propose(target_model, state.model, anchor, start, key, params, mode,
                                                      head), self.config.block_size)
            return dataclasses.replace(prop, confidence=self.model_confidence(state, prop.confidence),
                                       model_confidence=prop.confidence)

        def no_model_proposal():  # confidences 0: expected accepted length 0, every row takes the lookup draft
            shapes = jax.eval_shape(model_proposal)
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        skipped = self.skips_model(by_lookup)
        if model_pays is not None and self.config.price_model and state.model_rounds is not None:
            skipped = skipped | ~model_pays(by_lookup.confidence, by_lookup.num_drafted,
                                            *self.predicted_rows(state, by_lookup, params))
        by_model = jax.lax.cond(skipped, no_model_proposal, model_proposal)
        use = skipped | self.takes_lookup(by_lookup.expected_accept_length,
                                          self.model_expects(state, by_model, params))

        def pick(a, b):
            return jnp.where(use.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

        length = pick(by_lookup.num_drafted, by_model.num_drafted)
        lookup_expected = by_lookup.expected_accept_length.astype(jnp.float32)
        confidence = pick(by_lookup.confidence, by_model.confidence)
        if self.config.row_calibration is not None:  # after the choice: it never changes which draft is verified
            confidence = calibrated_rows(confidence, use, lookup_expected, length, params.temperature,
                                         self.config.row_calibration)
        return Proposal(tokens=pick(by_lookup.tokens, by_model.tokens),
                        draft_index=jnp.where(use[:, None], 0, by_model.draft_index), p_draft=by_model.p_draft,
                        confidence=confidence,
                        confidence_logits=pick(by_lookup.confidence_logits, by_model.confidence_logits),
                        length=length, deterministic=use,
                        model_skipped=jnp.broadcast_to(skipped, use.shape), model_confidence=by_model.model_confidence,
                        lookup_expected=lookup_expected, lookup_draft=by_lookup.lookup_draft)


def padded_proposal(proposal: Proposal, block: int) -> Proposal:
    """A model proposal of g <= `block` tokens as a block of `block`: the positions past g hold token 0 with
    confidence 0 and zero p_draft rows, and `length` says g, so they are never verified."""
    g = proposal.tokens.shape[1]
    if g == block:
        return proposal

    def pad(x):
        return None if x is None else jnp.pad(x, [(0, 0), (0, block - g)] + [(0, 0)] * (x.ndim - 2))

    return dataclasses.replace(proposal, tokens=pad(proposal.tokens), draft_index=pad(proposal.draft_index),
                               p_draft=pad(proposal.p_draft), confidence=pad(proposal.confidence),
                               confidence_logits=pad(proposal.confidence_logits), length=proposal.num_drafted)


def model_score(proposal: Proposal, params, later: jax.Array | None = None) -> jax.Array:
    """[B] the model draft's expected accepted length for the choice: Σ_k Π_{i≤k} c_i for greedy rows; for sampled
    rows (temperature > 0), whose c_2.. depend on this round's drawn tokens (module docstring), the same product
    with c_1 followed by `later` [B, ≥G]'s positions 2.. (the request's predicted conditional confidences from
    earlier rounds: `HybridDrafter.predicted_model_confidence`), or by c_1 at every position without it (Σ_k c_1^k)."""
    sampled = (params.temperature > 0)[:, None]
    conf = proposal.confidence
    first = conf[:, :1]
    rest = (jnp.broadcast_to(first, (conf.shape[0], conf.shape[1] - 1)) if later is None
            else later[:, 1:conf.shape[1]].astype(conf.dtype))
    scored = jnp.concatenate([first, rest], axis=1)
    return dataclasses.replace(proposal, confidence=jnp.where(sampled, scored, conf)).expected_accept_length

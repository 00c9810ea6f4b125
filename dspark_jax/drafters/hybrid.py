"""A trained drafter and prompt lookup together (`--drafter default+ngram`): each round, per request, both
propose and the one with the larger expected accepted length Σ_k Π_{i≤k} c_i is verified — the trained
drafter's calibrated confidence head against the lookup's online acceptance estimates.

The choice uses only what is known before any of the round's drafts is verified and never depends on a
sampled draft token itself, so verification stays lossless: at T > 0 the model's drafts are sampled and, with
a Markov head, c_k depends on x_{k−1}, so the model's side is scored from c_1 alone (Σ_k c_1^k; choosing
whether to verify x_1 from c_2.. would bias x_1's acceptance — DSpark Appendix A); greedy drafts are functions
of the past and use every c_k. A chosen lookup row is verified as a deterministic draft (one-hot p_d), a chosen
model row with the model's p_d. Both drafters see every committed token, whichever was chosen.

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
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.drafters.base import Proposal, RoundOutcome
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridState:
    """The two drafters' states and the model's record: model_tested / model_accepted [B, G], per request and
    draft position, how often a verified model draft reached position k with every earlier one accepted, and
    how often it was then accepted (None: no record — the head's confidences as they are)."""
    model: object
    lookup: object
    model_tested: jax.Array | None = None
    model_accepted: jax.Array | None = None


class HybridDrafter(nnx.Module):
    """`model` (DSpark, DFlash or Eagle3) + `lookup` (an `NgramDrafter` of the same block size)."""

    def __init__(self, model, lookup: NgramDrafter, skip_model_at: float = HybridConfig.skip_model_at,
                 model_prior_strength: float = HybridConfig.model_prior_strength):
        if model.config.block_size != lookup.config.block_size:
            raise ValueError(f"hybrid drafters need one block size, got {model.config.block_size} (model) and "
                             f"{lookup.config.block_size} (lookup)")
        self.model, self.lookup = model, lookup
        if not skip_model_at >= 0:
            raise ValueError(f"skip_model_at must be >= 0 (0: never run the model, inf: never skip it), got "
                             f"{skip_model_at}")
        if not model_prior_strength > 0:
            raise ValueError(f"model_prior_strength must be > 0, got {model_prior_strength}")
        self.config = HybridConfig(model.config.block_size, tuple(model.config.target_layer_ids),
                                   f"{model.config.algorithm}+ngram", skip_model_at=skip_model_at,
                                   model_prior_strength=model_prior_strength)

    @property
    def model_skip_threshold(self) -> float:
        """Expected accepted lookup drafts at or above which a request takes the lookup's draft (and a round in
        which every request does skips the model's forward)."""
        return float(self.config.skip_model_at)

    def set_block_size(self, gamma: int) -> None:
        """Propose `gamma` tokens (at most the model's trained block size)."""
        self.model.config = dataclasses.replace(self.model.config, block_size=gamma)
        self.lookup.config = dataclasses.replace(self.lookup.config, block_size=gamma)
        self.config = dataclasses.replace(self.config, block_size=gamma)

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

    def init_state(self, batch: int, max_len: int) -> HybridState:
        shape = (batch, self.config.block_size)  # distinct buffers: engines donate leaf by leaf
        return HybridState(self.model.init_state(batch, max_len), self.lookup.init_state(batch, max_len),
                           jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))

    def prefill(self, target_model, state: HybridState, features, prompts, prompt_lens) -> HybridState:
        return dataclasses.replace(
            state, model=self.model.prefill(target_model, state.model, features, prompts, prompt_lens),
            lookup=self.lookup.prefill(target_model, state.lookup, features, prompts, prompt_lens))

    def commit(self, target_model, state: HybridState, features, verified, start, count,
               outcome: RoundOutcome | None = None) -> HybridState:
        """Both drafters commit (`verified`, `start`, `count`, `outcome` as theirs: the lookup's record compares
        its proposal with the committed tokens, whichever draft was verified). With a verification round's
        `outcome` the model's record counts the rows whose model draft was verified (outcome.deterministic
        False; the model's drafts are sampled at T > 0, so their acceptance is only known where verified)."""
        new = dataclasses.replace(
            state, model=self.model.commit(target_model, state.model, features, verified, start, count, outcome),
            lookup=self.lookup.commit(target_model, state.lookup, features, verified, start, count, outcome))
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

    def skips_model(self, by_lookup: Proposal) -> jax.Array:
        """Scalar bool: whether this round skips the model's forward — every request's lookup draft expects at
        least `skip_model_at` accepted tokens (module docstring). Reads only the lookup's proposal."""
        return jnp.all(by_lookup.expected_accept_length >= self.model_skip_threshold)

    def propose(self, target_model, state: HybridState, anchor, start, key, params, mode, head) -> Proposal:
        by_lookup = self.lookup.propose(target_model, state.lookup, anchor, start, key, params, mode, head)

        def model_proposal():  # confidences corrected by the record here: a skipped model keeps confidence 0
            prop = self.model.propose(target_model, state.model, anchor, start, key, params, mode, head)
            return dataclasses.replace(prop, confidence=self.model_confidence(state, prop.confidence))

        def no_model_proposal():  # confidences 0: expected accepted length 0, every row takes the lookup draft
            shapes = jax.eval_shape(model_proposal)
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        skipped = self.skips_model(by_lookup)
        by_model = jax.lax.cond(skipped, no_model_proposal, model_proposal)
        lookup_expects = by_lookup.expected_accept_length
        use = (lookup_expects >= self.model_skip_threshold) | (lookup_expects > model_score(by_model, params))  # [B]

        def pick(a, b):
            return jnp.where(use.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

        return Proposal(tokens=pick(by_lookup.tokens, by_model.tokens),
                        draft_index=jnp.where(use[:, None], 0, by_model.draft_index), p_draft=by_model.p_draft,
                        confidence=pick(by_lookup.confidence, by_model.confidence),
                        confidence_logits=pick(by_lookup.confidence_logits, by_model.confidence_logits),
                        length=pick(by_lookup.num_drafted, by_model.num_drafted), deterministic=use,
                        model_skipped=jnp.broadcast_to(skipped, use.shape))


def model_score(proposal: Proposal, params) -> jax.Array:
    """[B] the model draft's expected accepted length for the choice: Σ_k Π_{i≤k} c_i for greedy rows, Σ_k c_1^k
    for sampled rows (temperature > 0), whose c_2.. depend on this round's drawn tokens (module docstring)."""
    sampled = (params.temperature > 0)[:, None]
    first = jnp.broadcast_to(proposal.confidence[:, :1], proposal.confidence.shape)
    return dataclasses.replace(proposal, confidence=jnp.where(sampled, first, proposal.confidence)
                               ).expected_accept_length

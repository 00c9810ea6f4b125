"""What every drafter hands the speculative loop, and helpers shared by drafters."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.drafters.vocab import VocabMap, build_maps, check_draft_vocab
from dspark_jax.models.config import TransformerConfig
from dspark_jax.models.output_head import HeadRows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Proposal:
    """One round's draft block for B requests and G = block size.

    tokens: [B, G] target ids; p_draft: [B, G, N] the exact (filtered, float32) distributions the tokens
    were drawn from, over the draft vocabulary, or None for deterministic drafts (lookup: p_d is one-hot at
    each token); confidence: [B, G] calibrated c_k (1 without a head); confidence_logits: [B, G] raw logits
    (0 without a head); length: [B] drafted tokens per request (None: all G); deterministic: [B] bool, rows
    whose tokens are deterministic drafts (p_d one-hot; their p_draft rows are ignored), None: no row, or
    every row when p_draft is None; model_skipped: [B] bool, True in every row of a hybrid drafter's round
    that skipped its model's forward (lookup drafts only: the round costs less, `round_costs.RoundCosts.lookup_seconds`;
    one value per row so that engines can write proposals row by row), None for other drafters;
    model_confidence: [B, G] a hybrid drafter's model head's calibrated c_k for every row, whichever draft the
    row takes (zeros where the model's forward was skipped), None for other drafters — what the hybrid's
    prediction of its model's next drafts learns from (`drafters.hybrid`); lookup_expected: [B] the lookup
    proposal's expected accepted length Σ_k Π_{i≤k} c_i (0 where it has no match) — prompt lookup's own, a hybrid
    drafter's lookup's whichever draft the row takes —, None for model drafters — recorded per round (`decoding.speculative.RoundStats`);
    lookup_draft: prompt lookup's own draft before its confidences (`drafters.ngram.LookupDraft`, a hybrid's
    lookup's whichever draft the row takes), handed to its commit through `RoundOutcome` so the commit does not
    search the text and the corpus again; None for model drafters.
    """
    tokens: jax.Array
    draft_index: jax.Array
    p_draft: jax.Array | None
    confidence: jax.Array
    confidence_logits: jax.Array
    length: jax.Array | None = None
    deterministic: jax.Array | None = None
    model_skipped: jax.Array | None = None
    model_confidence: jax.Array | None = None
    lookup_expected: jax.Array | None = None
    lookup_draft: object | None = None

    @property
    def num_drafted(self) -> jax.Array:
        """[B] tokens each request drafted (G unless the drafter says fewer)."""
        if self.length is None:
            return jnp.full(self.tokens.shape[:1], self.tokens.shape[1], jnp.int32)
        return self.length

    @property
    def expected_accept_length(self) -> jax.Array:
        """[B] Σ_k Π_{i≤k} c_i over each request's drafted positions: the drafts a full verification is
        expected to accept, by the proposal's own confidences."""
        g = self.tokens.shape[1]
        drafted = jnp.arange(g)[None] < self.num_drafted[:, None]
        return jnp.sum(jnp.cumprod(jnp.where(drafted, self.confidence, 0.0), axis=1), axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundOutcome:
    """What a verification round hands the drafter's `commit` beyond the committed positions (plain rounds pass
    None). num_verified [B]: drafts verified per request; committed [B, G+1]: the round's new tokens at positions
    start+1.. (the first `count` valid: the accepted drafts, then the target's correction or bonus token);
    deterministic [B] bool: rows whose verified draft was deterministic (`Proposal.deterministic`; None: the
    proposal's p_draft decides for every row); model_skipped [B], model_confidence [B, G]: the proposal's
    (`Proposal`; None for drafters other than a hybrid); lookup_draft: the proposal's (`Proposal.lookup_draft`; None:
    the lookup's commit computes it again). Given its prefix, each committed token is a draw from the target's
    (filtered) distribution — losslessness — whichever draft was verified."""
    num_verified: jax.Array
    committed: jax.Array
    deterministic: jax.Array | None = None
    model_skipped: jax.Array | None = None
    model_confidence: jax.Array | None = None
    lookup_draft: object | None = None


def draft_layer_config(target: TransformerConfig, num_layers: int) -> TransformerConfig:
    """Draft layers: the target's family and widths, every layer full attention with the target's
    global RoPE (base and scaling of its full-attention layers)."""
    full = [i for i, t in enumerate(target.layer_types) if t == "full_attention"]
    theta = target.rope_thetas[full[0]] if full else max(target.rope_thetas)
    return dataclasses.replace(target, num_layers=num_layers, layer_types=("full_attention",) * num_layers,
                               rope_thetas=(theta,) * num_layers, sliding_window=None, name=f"{target.name}-draft")


def draft_head_matrix(target_model, draft_to_target: jax.Array, full_vocab: bool) -> jax.Array:
    """[N, d] output embedding rows of the draft vocabulary, shared with (copied from) the frozen target."""
    head = target_model.embed_tokens[...] if target_model.lm_head is None else target_model.lm_head[...].T
    return head if full_vocab else jnp.take(head, draft_to_target, axis=0)


def draft_head_rows(target_model, draft_to_target: jax.Array, full_vocab: bool) -> HeadRows:
    """The draft vocabulary's output embedding rows for decoding: the float32 rows of `draft_head_matrix`, and the
    same rows of the target's Q8_0 blocks where its head reads them through the `q8_ffi` kernel
    (`Transformer.head_q8_kernel`, `models.transformer.with_q8_head`), so that the drafter's head takes the
    kernel at the row counts the target's does (`models.output_head.head_logits`; a 15-token block's 15 rows
    over a 32k vocabulary: BENCHMARKS.md "Session 51")."""
    table = draft_head_matrix(target_model, draft_to_target, full_vocab)
    if target_model.lm_head is not None or not getattr(target_model, "head_q8_kernel", False):
        return HeadRows(table)
    values, scales = target_model.head_q8_values[...], target_model.head_q8_scales[...]
    if not full_vocab:
        values, scales = jnp.take(values, draft_to_target, axis=0), jnp.take(scales, draft_to_target, axis=0)
    return HeadRows(table, values, scales)


class DrafterBase(nnx.Module):
    """What every drafter shares: fitting checks, the frozen target's identity, the draft vocabulary maps."""

    def _init_common(self, config, target: TransformerConfig, dtype, draft_vocab_ids) -> None:
        config.check_fits(target)
        check_draft_vocab(config, draft_vocab_ids)
        self.config, self.target_config, self.dtype = config, target, dtype
        self.attn_impl = "reference"  # static: `models.attn_impl.with_attn_impl` changes it
        d2t, t2d = build_maps(draft_vocab_ids if config.draft_vocab_size else None, target.vocab_size)
        self.draft_to_target, self.target_to_draft = VocabMap(d2t), VocabMap(t2d)

    @property
    def full_vocab(self) -> bool:
        return self.config.draft_vocab_size is None

    @property
    def vocab_size(self) -> int:
        return self.config.draft_vocab_size or self.target_config.vocab_size

    def head_matrix(self, target_model) -> jax.Array:
        """[N, d] output embedding rows of the draft vocabulary (the frozen target's)."""
        return draft_head_matrix(target_model, self.draft_to_target[...], self.full_vocab)

    def head_rows(self, target_model) -> HeadRows:
        """The rows of `head_matrix` for decoding, with the same rows of the target's int8 blocks where its head runs
        the `q8_ffi` kernel (`head_q8_kernel`; `draft_head_rows`)."""
        return draft_head_rows(target_model, self.draft_to_target[...], self.full_vocab)


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    return cap * jnp.tanh(logits / cap) if cap else logits


def nearest_set(calibrated_at: jax.Array, sampling_temperature: jax.Array) -> jax.Array:
    """[B] index of the set (a confidence head's calibration, lookup's prior) fitted nearest to each request's
    sampling temperature [B] (`calibrated_at` [S] ascending; a tie takes the lower temperature's set)."""
    gap = jnp.abs(jnp.asarray(sampling_temperature, jnp.float32)[:, None] - calibrated_at[None, :])
    return jnp.argmin(gap, axis=1)

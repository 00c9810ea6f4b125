"""Drafter training losses and metrics (spec §2.6, §2.7, §2.9): pure fp32 functions, jit-able.

DSpark/DFlash (`dspark_loss`) works per slot of the [B, K, G] blocks (batch, anchors, block size):

    w_k   = exp(-k / decay) * eval_mask                                    (k 0-based)
    CE    = Σ w·(-log p_d(label)) / Σ w         over slots whose label is in the draft vocabulary
    L1    = Σ w·‖p_d − p_t‖₁ / Σ w              (= 2·TV; p_d is zero outside the draft vocabulary)
    Conf  = Σ w·BCEwithLogits(z, c*) / Σ w,     c* = clamp(1 − ½‖p_d − p_t‖₁, 0, 1), label detached
    loss  = α_ce·CE + α_l1·L1 + α_conf·Conf     DSpark α = (0.1, 0.9, 1.0), DFlash α = (1, 0, 0)

All terms are weighted MEANS over the valid slots of the whole array passed in (the spec's global
normalisation: with the batch sharded over devices under `jit`, the sums are global). The target side
(target_logits, target_lse) is treated as frozen: it is wrapped in `stop_gradient`.

For huge vocabularies, `dspark_slot_terms` can be evaluated chunk by chunk (e.g. over anchors inside a
scan) keeping only its [B, K, G] outputs, and `dspark_reduce` turns the concatenated terms into the loss.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

DSPARK_ALPHA = (0.1, 0.9, 1.0)
DFLASH_ALPHA = (1.0, 0.0, 0.0)


def position_weights(block_size: int, decay: float = 4.0) -> jax.Array:
    """w_k = exp(-k / decay), k = 0..block_size-1: [1, .779, .607, .472, .368, .287, .223] for G=7."""
    return jnp.exp(-jnp.arange(block_size, dtype=jnp.float32) / jnp.float32(decay))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (no valid slots)."""
    return num / jnp.where(den > 0, den, 1.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotTerms:
    """Per-slot quantities [B, K, G] (any leading shape) — everything `dspark_reduce` needs."""
    ce: jax.Array        # -log p_d(label); 0 where the label is outside the draft vocabulary or masked
    in_vocab: jax.Array  # bool: label is a draft-vocabulary index (the slot takes part in CE)
    l1: jax.Array        # ‖p_d − p_t‖₁ including the target mass outside the draft vocabulary
    accept: jax.Array    # c* = clamp(1 − ½·l1, 0, 1), stop-gradient (soft confidence label)


def dspark_slot_terms(draft_logits: jax.Array, target_logits: jax.Array, target_lse: jax.Array | None,
                      labels: jax.Array, eval_mask: jax.Array) -> SlotTerms:
    """Per-slot CE, L1 and soft acceptance label, in fp32.

    draft_logits [..., N]: Markov-corrected, teacher-forced draft logits over the draft vocabulary.
    target_logits [..., N]: the target's logits at the same positions restricted to the draft columns.
    target_lse [...] or None: log-sum-exp of the target's FULL-vocabulary logits; None means the draft
        vocabulary is the full vocabulary (then p_t = softmax(target_logits)).
    labels [...]: draft-vocabulary index of the label, or -1 when it is outside the draft vocabulary.
    Masked slots may hold garbage (even NaN); they are replaced by zeros before any arithmetic so neither
    the values nor the gradients of valid slots can be poisoned.
    """
    mask = jnp.asarray(eval_mask).astype(bool)
    n = draft_logits.shape[-1]
    d = jnp.where(mask[..., None], draft_logits.astype(jnp.float32), 0.0)
    t = jax.lax.stop_gradient(jnp.where(mask[..., None], target_logits.astype(jnp.float32), 0.0))
    logp_d = jax.nn.log_softmax(d, axis=-1)
    p_d = jnp.exp(logp_d)
    if target_lse is None:
        p_t = jax.nn.softmax(t, axis=-1)
        outside = jnp.zeros(mask.shape, jnp.float32)
    else:
        # Masked slots: t == 0 there, so log(N) makes p_t uniform with no outside mass (finite).
        lse = jax.lax.stop_gradient(jnp.where(mask, target_lse.astype(jnp.float32), jnp.float32(math.log(n))))
        p_t = jnp.exp(t - lse[..., None])
        outside = jnp.maximum(1.0 - jnp.sum(p_t, axis=-1), 0.0)   # p_d is 0 there: counts fully
    l1 = jnp.sum(jnp.abs(p_d - p_t), axis=-1) + outside
    accept = jax.lax.stop_gradient(jnp.clip(1.0 - 0.5 * l1, 0.0, 1.0))
    labels = jnp.asarray(labels).astype(jnp.int32)
    in_vocab = (labels >= 0) & (labels < n) & mask
    safe_labels = jnp.where(in_vocab, labels, 0)
    nll = -jnp.take_along_axis(logp_d, safe_labels[..., None], axis=-1)[..., 0]
    ce = jnp.where(in_vocab, nll, 0.0)
    return SlotTerms(ce=ce, in_vocab=in_vocab, l1=jnp.where(mask, l1, 0.0), accept=jnp.where(mask, accept, 0.0))


def dspark_reduce(terms: SlotTerms, conf_logits: jax.Array | None, eval_mask: jax.Array, *,
                  alpha: Sequence[float] = DSPARK_ALPHA, decay: float = 4.0) -> tuple[jax.Array, dict]:
    """Weighted means of the per-slot terms [..., G] -> (loss, metrics); see `dspark_loss`."""
    mask = jnp.asarray(eval_mask).astype(bool)
    a_ce, a_l1, a_conf = alpha
    G = mask.shape[-1]
    m = mask.astype(jnp.float32)
    wm = position_weights(G, decay) * m
    w_sum = jnp.sum(wm)
    w_ce = wm * terms.in_vocab.astype(jnp.float32)
    ce = _safe_div(jnp.sum(w_ce * terms.ce), jnp.sum(w_ce))
    l1 = _safe_div(jnp.sum(wm * terms.l1), w_sum)
    loss = a_ce * ce + a_l1 * l1

    lead = tuple(range(mask.ndim - 1))
    n_valid = jnp.sum(m)
    c = jnp.where(mask, terms.accept, 0.0)
    survival = jnp.cumprod(c, axis=-1)
    first = m[..., 0]
    metrics = {
        "ce": ce,
        "l1": l1,
        "conf": jnp.float32(0.0),
        "accept_rate": _safe_div(jnp.sum(m * c, axis=lead), jnp.sum(m, axis=lead)),    # [G]
        "tau_probabilistic": _safe_div(jnp.sum(first * (1.0 + jnp.sum(survival, axis=-1))), jnp.sum(first)),
        "num_valid_slots": n_valid,
        "num_valid_blocks": jnp.sum(first),
    }
    if conf_logits is not None:
        z = jnp.where(mask, conf_logits.astype(jnp.float32), 0.0)
        bce = jax.nn.softplus(z) - c * z          # BCE-with-logits against the soft (detached) label c*
        conf = _safe_div(jnp.sum(wm * bce), w_sum)
        sig = jax.nn.sigmoid(z)
        sig_surv = jnp.cumprod(jnp.where(mask, sig, 0.0), axis=-1)
        metrics["conf"] = conf
        metrics["confidence_abs_error"] = _safe_div(jnp.sum(m * jnp.abs(sig - c)), n_valid)
        metrics["confidence_bias"] = _safe_div(jnp.sum(m * (sig - c)), n_valid)
        metrics["confidence_cumprod_bias"] = _safe_div(jnp.sum(m * (sig_surv - survival)), n_valid)
        if not (isinstance(a_conf, (int, float)) and a_conf == 0):
            loss = loss + a_conf * conf
    metrics["loss"] = loss
    return loss, metrics


def dspark_loss(draft_logits: jax.Array, target_logits: jax.Array, target_lse: jax.Array | None,
                labels: jax.Array, conf_logits: jax.Array | None, eval_mask: jax.Array, *,
                alpha: Sequence[float] = DSPARK_ALPHA, decay: float = 4.0) -> tuple[jax.Array, dict]:
    """DSpark/DFlash training loss (spec §2.6) and logged metrics (§2.7), fp32.

    Shapes: draft_logits, target_logits [B, K, G, N]; target_lse, labels, conf_logits, eval_mask [B, K, G]
    (any leading shape works; the block axis G is last before N).
    - draft_logits: Markov-corrected, teacher-forced draft logits over the draft vocabulary (N columns).
    - target_logits: target logits restricted to the SAME draft-vocabulary columns; target_lse: log-sum-exp
      of the target's full-vocabulary logits at those positions (None: the draft vocabulary is the full
      vocabulary and lse comes from target_logits). p_t = exp(target_logits − lse); the target mass outside
      the draft vocabulary, 1 − Σ_N p_t, counts fully in the L1 term because p_d is zero there:
      L1 = Σ_N |p_d − p_t| + (1 − Σ_N p_t).
    - labels: draft-vocabulary index of the label, -1 if outside the draft vocabulary. Such slots are
      EXCLUDED FROM THE CE TERM ONLY (from its numerator and its Σw denominator), because the draft can
      never produce those tokens; they still count in L1, confidence and the metrics.
    - conf_logits: confidence-head logits, or None (no confidence term/metrics). The BCE label
      c* = clamp(1 − ½·L1, 0, 1) is computed at temperature 1 and detached (stop_gradient), so the
      confidence term's gradient reaches only conf_logits.
    - eval_mask: slots that are supervised; weights are exp(−k/decay)·eval_mask.
    - alpha = (α_ce, α_l1, α_conf): static Python numbers (or arrays); α_conf == 0 (Python number) or
      conf_logits None leaves the confidence term out of the loss. DSpark (0.1, 0.9, 1.0), DFlash (1, 0, 0).

    Metrics: ce, l1, conf (the unscaled terms; conf 0 without conf_logits), accept_rate [G] (mean of c*_k
    over valid slots), tau_probabilistic (mean over valid blocks of 1 + Σ_k Π_{i≤k} c*_i, c* zeroed where
    eval_mask is False), num_valid_slots, num_valid_blocks, loss, and with conf_logits also
    confidence_abs_error / confidence_bias (mean over valid slots of |σ(z) − c*| / σ(z) − c*) and
    confidence_cumprod_bias (mean over valid slots of Π_{i≤k} σ(z_i) − Π_{i≤k} c*_i).
    With no valid slot at all every mean is 0 (never NaN).
    """
    terms = dspark_slot_terms(draft_logits, target_logits, target_lse, labels, eval_mask)
    return dspark_reduce(terms, conf_logits, eval_mask, alpha=alpha, decay=decay)


def eagle3_ttt_loss(step_log_probs: jax.Array, step_target_probs: jax.Array, step_masks: jax.Array,
                    decay: float = 0.8) -> tuple[jax.Array, dict]:
    """Eagle3 test-time-training loss (spec §2.9).

    step_log_probs [S, B, T, N]: draft log-softmax at each TTT step at T query rows per sequence (every row, or
    sampled draft starts); step_target_probs [S, B, T, N]: the target distribution each query is trained toward
    (frozen: stop_gradient); step_masks [S, B, T].
    loss_k = −Σ_{masked b,t} Σ_v q·log p / (B·T)  (divided by ALL query slots, the repo's "local mean"),
    loss = Σ_k decay^k · loss_k. Terms with q == 0 contribute 0 even where log p = −inf.
    Metrics: loss, loss_per_step [S], accuracy_per_step [S] (argmax agreement over masked positions, 0 when
    a step has none), num_valid_per_step [S].
    """
    S, B, T, _ = step_log_probs.shape
    mask = jnp.asarray(step_masks).astype(bool)
    logp = jnp.where(mask[..., None], step_log_probs.astype(jnp.float32), 0.0)
    q = jax.lax.stop_gradient(jnp.where(mask[..., None], step_target_probs.astype(jnp.float32), 0.0))
    soft_ce = -jnp.sum(jnp.where(q > 0, q * logp, 0.0), axis=-1)                    # [S, B, T]
    step_loss = jnp.sum(jnp.where(mask, soft_ce, 0.0), axis=(1, 2)) / (B * T)       # [S]
    loss = jnp.sum(jnp.float32(decay) ** jnp.arange(S, dtype=jnp.float32) * step_loss)
    m = mask.astype(jnp.float32)
    agree = (jnp.argmax(logp, axis=-1) == jnp.argmax(q, axis=-1)).astype(jnp.float32)
    n_valid = jnp.sum(m, axis=(1, 2))
    metrics = {
        "loss": loss,
        "loss_per_step": step_loss,
        "accuracy_per_step": _safe_div(jnp.sum(m * agree, axis=(1, 2)), n_valid),
        "num_valid_per_step": n_valid,
    }
    return loss, metrics

"""Hardware-aware draft length for the jitted speculative loop: each round verifies every request at one width
w (anchor + up to w − 1 drafts), chosen from a few compiled widths to maximise expected committed tokens per
unit of verification cost (DSpark §5's scheduler objective Θ = τ · SPS, for the dense bucket of the loop).

Notation: c [B, G] calibrated per-position confidences, a_{b,j} = Π_{i<=j} c_{b,i}; at width w request b
verifies ℓ_b(w) = min(n_b, w − 1) drafts and is expected to commit 1 + Σ_{j<ℓ_b(w)} a_{b,j} tokens; a round at
width w costs cost(w) (seconds, or relative to width 1 — only ratios matter).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def covering_width(num_drafts: jax.Array, widths: tuple[int, ...]) -> jax.Array:
    """Index of the smallest width that verifies every request's drafts (max_b n_b + 1 rows); the last width
    when none does. num_drafts [B] int."""
    need = jnp.max(num_drafts) + 1
    return jnp.minimum(jnp.searchsorted(jnp.asarray(widths), need), len(widths) - 1).astype(jnp.int32)


def expected_committed(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array,
                       widths: tuple[int, ...]) -> jax.Array:
    """[len(widths)] expected tokens committed by the active requests in one round at each width:
    Σ_b active_b (1 + Σ_{j < min(n_b, w − 1)} a_{b,j})."""
    a = jnp.cumprod(jnp.clip(confidence.astype(jnp.float32), 0.0, 1.0), axis=1)  # [B, G]
    prefix = jnp.concatenate([jnp.zeros_like(a[:, :1]), jnp.cumsum(a, axis=1)], axis=1)  # [B, G+1]
    g = a.shape[1]
    lengths = jnp.minimum(num_drafts[:, None], jnp.minimum(jnp.asarray(widths) - 1, g)[None])  # [B, W]
    gain = jnp.take_along_axis(prefix, lengths, axis=1)
    return jnp.sum(jnp.where(active[:, None], 1.0 + gain, 0.0), axis=0)


def width_rates(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array, widths: tuple[int, ...],
                costs: tuple[float, ...]) -> jax.Array:
    """[len(widths)] expected committed tokens per unit cost of this round at each width up to the covering
    width, −inf beyond it (wider widths verify nothing more). Shapes as in `choose_width`."""
    cover = covering_width(num_drafts, widths)
    rate = expected_committed(confidence, num_drafts, active, widths) / jnp.asarray(costs, jnp.float32)
    return jnp.where(jnp.arange(len(widths)) <= cover, rate, -jnp.inf)


def choose_width(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array, widths: tuple[int, ...],
                 costs: tuple[float, ...] | None) -> jax.Array:
    """Index into `widths` of this round's verification width.

    costs None: the covering width (verify everything proposed). Otherwise the width with the largest
    expected committed tokens / cost among those up to the covering width (ties → the narrower one).
    Lossless: the choice reads only confidences and proposal lengths, known before any draft is verified.
    Shapes: confidence [B, G], num_drafts [B] (0..G), active [B] bool; widths ascending, widths[0] = 1."""
    if costs is None:
        return covering_width(num_drafts, widths)
    return jnp.argmax(width_rates(confidence, num_drafts, active, widths, costs)).astype(jnp.int32)


def efficient_widths(widths: tuple[int, ...], costs: tuple[float, ...], max_widths: int = 5
                     ) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The widths worth compiling: 1, the widest, and those that cost less than every wider width (a width that
    costs as much as a wider one is never the best choice), at most `max_widths` of them (the widest, the
    narrowest and the ones with the largest cost steps to their next wider neighbour). Raises ValueError
    on mismatched or non-positive input."""
    if len(widths) != len(costs) or not widths:
        raise ValueError(f"one cost per width needed, got {len(widths)} widths and {len(costs)} costs")
    if list(widths) != sorted(set(widths)) or widths[0] != 1:
        raise ValueError(f"widths must be strictly increasing from 1, got {widths}")
    if any(not np.isfinite(c) or c <= 0 for c in costs):
        raise ValueError(f"costs must be positive, got {costs}")
    keep = [len(widths) - 1]
    for i in range(len(widths) - 2, -1, -1):
        if costs[i] < costs[keep[-1]] or i == 0:
            keep.append(i)
    keep = sorted(set(keep))
    if len(keep) > max_widths:  # keep the ends and the interior widths that save the most against the next one
        inner = keep[1:-1]
        saving = {i: costs[keep[keep.index(i) + 1]] - costs[i] for i in inner}
        inner = sorted(sorted(inner, key=lambda i: -saving[i])[:max_widths - 2])
        keep = [keep[0]] + inner + [keep[-1]]
    return tuple(widths[i] for i in keep), tuple(float(costs[i]) for i in keep)


def proposal_lengths(confidence: jax.Array, threshold: jax.Array) -> jax.Array:
    """Static-threshold truncation: index of the first k with c_k < threshold (G if none, or threshold <= 0).
    confidence [B, G]; threshold: a scalar or one per request [B]. The one static-threshold rule (the jitted
    loop, the engine and the offline threshold sweep all call it)."""
    g = confidence.shape[1]
    threshold = jnp.reshape(threshold, (-1, 1)) if jnp.ndim(threshold) else threshold
    low = (confidence < threshold) & (threshold > 0)
    return jnp.where(low.any(1), jnp.argmax(low, axis=1), g).astype(jnp.int32)

"""A hybrid drafter's row calibration: the confidences of the row each request verifies, mapped by a logistic
calibration fitted on the hybrid's own rounds (BENCHMARKS.md "Session 44"; a deviation from the paper, which
calibrates a drafter alone).

Why: a hybrid verifies whichever of its two drafts expects more, so its rows are a selection. Its model rows
where the lookup had a match and was declined were accepted at position 1 in 0.29 of the rounds while the
model's calibrated head promised 0.51 (5,367 rounds of the calibration prompts, T = 0) — a failing copy is
evidence against the model's draft too. The calibration reads the row's source, its confidence, whether the
lookup had a match and the lookup's expected accepted length E_L:

    c'_k = σ(w · φ_k),  φ_k = per source s ∈ {lookup, model}: [s], [s]·logit c_k, [s]·[k = 1], [s]·[k = 1]·logit c_k;
                        model rows also [E_L > 0], [E_L > 0]·log(1 + E_L);
                        per source [s]·u_k, [s]·u_k³ with u_k = 2 c_k − 1

(`FEATURES` names them in order). The last four (since session 45) bend the map where a straight line in logit c
cannot follow the rows: the model rows the head rates 0.65–0.9 were accepted at position 1 in 0.85–0.98 of the
rounds while those it rates 0.25–0.55 fell short (BENCHMARKS.md "Session 45"). A record fitted without them
(session 44's ten features, `LEGACY_FEATURES`) loads with their weights 0: the same map. The map is applied after the choice, so it never changes which draft a
request verifies: it changes the confidences the loop's scheduler reads (bucket, draft length, gate) and the
ones it reports. It reads only the round's proposals, known before verification, so decoding stays lossless.
Applied to requests sampled at T ≤ `MAX_TEMPERATURE` only (fitted on greedy rounds; at T > 0 a model draft is
sampled and its c_2.. depend on the drawn tokens), and only at drafted positions (a lookup's c_k past its match
stays 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LEGACY_FEATURES = ("lookup_bias", "lookup_logit", "lookup_first_bias", "lookup_first_logit",
                   "model_bias", "model_logit", "model_first_bias", "model_first_logit",
                   "model_lookup_match", "model_lookup_match_log1p_expected")  # session 44's map
FEATURES = LEGACY_FEATURES + ("lookup_centered", "lookup_centered_cubed", "model_centered", "model_centered_cubed")
MAX_TEMPERATURE = 0.5  # requests sampled hotter keep their confidences (the weights are fitted at T = 0)
META_KEY = "hybrid_calibration"  # where a drafter directory's drafter.json keeps the weights (`checkpoint`)
_EPS = 1e-6


def _logit(c):
    c = jnp.clip(c, _EPS, 1.0 - _EPS)
    return jnp.log(c) - jnp.log1p(-c)


def row_features(confidence: jax.Array, lookup_row: jax.Array, lookup_expected: jax.Array) -> jax.Array:
    """[B, G, F] the calibration's features (`FEATURES`) of each row's confidences [B, G], from its source
    lookup_row [B] (bool: the row verifies the lookup's draft) and the lookup's expected accepted length [B]."""
    b, g = confidence.shape
    lookup = jnp.broadcast_to(lookup_row.astype(jnp.float32)[:, None], (b, g))
    model = 1.0 - lookup
    first = jnp.broadcast_to((jnp.arange(g) == 0).astype(jnp.float32)[None], (b, g))
    logit = _logit(confidence.astype(jnp.float32))
    e = jnp.asarray(lookup_expected, jnp.float32)
    match = jnp.broadcast_to((e > 0).astype(jnp.float32)[:, None], (b, g))
    log1p_e = jnp.broadcast_to(jnp.log1p(jnp.maximum(e, 0.0))[:, None], (b, g))
    cols = []
    for source in (lookup, model):
        cols += [source, source * logit, source * first, source * first * logit]
    cols += [model * match, model * match * log1p_e]
    u = 2.0 * jnp.clip(confidence.astype(jnp.float32), 0.0, 1.0) - 1.0
    for source in (lookup, model):
        cols += [source * u, source * u ** 3]
    return jnp.stack(cols, axis=-1)


def calibrated_rows(confidence: jax.Array, lookup_row: jax.Array, lookup_expected: jax.Array,
                    num_drafted: jax.Array, temperature: jax.Array, weights: tuple[float, ...]) -> jax.Array:
    """[B, G] σ(w · φ) at the drafted positions (k < num_drafted [B]) of requests with temperature [B] ≤
    `MAX_TEMPERATURE`; every other entry as given. confidence [B, G]; lookup_row [B] bool; lookup_expected [B]."""
    if len(weights) != len(FEATURES):
        raise ValueError(f"a hybrid row calibration has {len(FEATURES)} weights ({', '.join(FEATURES)}), got "
                         f"{len(weights)}")
    mapped = jax.nn.sigmoid(row_features(confidence, lookup_row, lookup_expected) @ jnp.asarray(weights, jnp.float32))
    g = confidence.shape[1]
    use = ((jnp.arange(g)[None] < num_drafted[:, None])
           & (jnp.asarray(temperature, jnp.float32) <= MAX_TEMPERATURE)[:, None])
    return jnp.where(use, mapped.astype(confidence.dtype), confidence)

"""Hardware-aware draft length for the jitted speculative loop: each round verifies one flat bucket of T
rows (`models.layout`): every active request's anchor plus the T − n_active drafts of highest prefix survival
(`allocate_top_k`), T chosen from a few compiled buckets to maximise expected committed tokens per unit of
round cost (DSpark §5's scheduler objective Θ = τ · SPS, with its production top-K allocation, §5.2).

Notation: c [B, G] calibrated per-position confidences, a_{b,j} = Π_{i<=j} c_{b,i}; request b proposed n_b
drafts; a bucket of T rows holds the n_active anchors and verifies the T − n_active allowed drafts (j < n_b) of
highest a_{b,j} (a prefix of each request's proposal, since a_{b,j} does not increase with j), expected to
commit n_active + Σ a over them; a round at bucket T costs cost(T) (seconds, or relative — only ratios matter).
At batch 1 a bucket is the verification width (anchor + drafts).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def survival(confidence: jax.Array) -> jax.Array:
    """a_{b,j} = Π_{i<=j} c_{b,i} [B, G], confidences clipped to [0, 1]."""
    return jnp.cumprod(jnp.clip(confidence.astype(jnp.float32), 0.0, 1.0), axis=1)


def allocate_top_k(confidence: jax.Array, max_draft: jax.Array, budget: jax.Array) -> jax.Array:
    """The `budget` drafts with the highest prefix survival a_{r,j} (ties to lower positions), within
    per-request caps max_draft [R]; drafts with a = 0 are never taken. confidence [R, G]. Returns ℓ [R] int32
    (DSpark §5.2's production variant: the device fills the budget by fresh survival ranking).

    Lossless: whether (r, j) is admitted depends on a_{r,j} (known before x_{r,j} is drawn), other requests,
    and the budget; a_{r,j'} for j' > j are never ranked above a_{r,j}, so x_{r,j} cannot influence it."""
    r_n, g = confidence.shape
    a = survival(confidence)
    allowed = jnp.arange(g)[None] < max_draft[:, None]
    score = jnp.where(allowed & (a > 0), a, -1.0)
    flat = score.reshape(-1)
    # rank by (score desc, position asc): stable argsort over position-major order
    pos_major = jnp.transpose(score).reshape(-1)
    order = jnp.argsort(-pos_major, stable=True)
    rank = jnp.zeros((r_n * g,), jnp.int32).at[order].set(jnp.arange(r_n * g, dtype=jnp.int32))
    rank = jnp.transpose(rank.reshape(g, r_n)).reshape(-1)
    chosen = (rank < budget) & (flat > -1.0)
    return chosen.reshape(r_n, g).sum(1).astype(jnp.int32)


def budget_confidence(fresh: jax.Array, stale: jax.Array, sampled: jax.Array) -> jax.Array:
    """The confidences a round's bucket is chosen from [B, G]. A request whose drafts were sampled (T > 0, model
    drafts) reads position 1 fresh (c_1 depends on no token drawn this round) and later positions from `stale`
    (its last drafted round's confidences; negative where it has none: c_1 repeated): with a Markov head c_k
    depends on x_{k−1}, so a bucket chosen from fresh c_2.. would decide whether x_1 is verified from x_1 itself —
    DSpark Appendix A's selection bias. Deterministic drafts (lookup, greedy argmax) are functions of the past:
    fresh throughout. Rows of the same bucket are then filled by fresh survival (`allocate_top_k`), which is
    lossless (§5.2's production variant). sampled [B] bool."""
    later = jnp.arange(fresh.shape[1])[None] >= 1
    stale = jnp.where(stale < 0, fresh[:, :1], stale)
    return jnp.where(sampled[:, None] & later, stale, fresh)


def per_request_rows(batch: int, gamma: int, bucket: int) -> int:
    """Rows one request may take in a bucket (its anchor and up to min(γ, bucket − batch) drafts): the static
    width of the bucket's dense grid view, so attention costs batch × this, not batch × (γ + 1)."""
    return min(gamma, bucket - batch) + 1


def bucket_caps(num_drafts: jax.Array, active: jax.Array, bucket: int) -> jax.Array:
    """[B] drafts request b may verify in a bucket of `bucket` rows: min(n_b, per-request rows − 1), 0 when
    inactive. num_drafts [B] int, active [B] bool."""
    return jnp.where(active, jnp.minimum(num_drafts, bucket - num_drafts.shape[0]), 0).astype(jnp.int32)


def covering_bucket(num_drafts: jax.Array, active: jax.Array, buckets: tuple[int, ...]) -> jax.Array:
    """Index of the smallest bucket that verifies every active request's drafts (n_active + Σ n_b rows, and
    max n_b per request); the last bucket when none does. num_drafts [B] int, active [B] bool."""
    n = jnp.where(active, num_drafts, 0)
    fits = jnp.asarray([(jnp.sum(active) + jnp.sum(n) <= t) & (jnp.max(n) <= t - n.shape[0]) for t in buckets])
    return jnp.where(fits.any(), jnp.argmax(fits), len(buckets) - 1).astype(jnp.int32)


def expected_committed(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array,
                       buckets: tuple[int, ...]) -> jax.Array:
    """[len(buckets)] expected tokens committed by the active requests in one round at each bucket T:
    n_active + the sum of the T − n_active largest a_{b,j} with j < `bucket_caps` (what `allocate_top_k`
    verifies)."""
    a = survival(confidence)
    g = a.shape[1]
    n_active = jnp.sum(active).astype(jnp.int32)
    out = []
    for t in buckets:
        values = jnp.where(jnp.arange(g)[None] < bucket_caps(num_drafts, active, t)[:, None], a, 0.0).reshape(-1)
        top = jnp.cumsum(-jnp.sort(-values))
        k = jnp.clip(t - n_active, 0, values.shape[0])
        out.append(jnp.where(k > 0, top[jnp.maximum(k - 1, 0)], 0.0))
    return n_active.astype(jnp.float32) + jnp.stack(out)


def bucket_rates(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array, buckets: tuple[int, ...],
                 costs: tuple[float, ...]) -> jax.Array:
    """[len(buckets)] expected committed tokens per unit cost of this round at each bucket up to the covering
    bucket, −inf beyond it (larger buckets verify nothing more). Shapes as in `choose_bucket`."""
    cover = covering_bucket(num_drafts, active, buckets)
    rate = expected_committed(confidence, num_drafts, active, buckets) / jnp.asarray(costs, jnp.float32)
    return jnp.where(jnp.arange(len(buckets)) <= cover, rate, -jnp.inf)


def choose_bucket(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array, buckets: tuple[int, ...],
                  costs: tuple[float, ...] | None) -> jax.Array:
    """Index into `buckets` of this round's verification bucket.

    costs None: the covering bucket (verify everything proposed). Otherwise the bucket with the largest
    expected committed tokens / cost among those up to the covering bucket (ties → the smaller one).
    Lossless: the choice reads only confidences and proposal lengths, known before any draft is verified.
    Shapes: confidence [B, G], num_drafts [B] (0..G), active [B] bool; buckets ascending, buckets[0] >= B."""
    if costs is None:
        return covering_bucket(num_drafts, active, buckets)
    return jnp.argmax(bucket_rates(confidence, num_drafts, active, buckets, costs)).astype(jnp.int32)


def verified_drafts(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array, bucket: int,
                    take_all: bool) -> jax.Array:
    """[B] drafts each request verifies in a bucket of `bucket` rows (within `bucket_caps`): the
    highest-survival ones (`allocate_top_k`) — or, with `take_all` (no cost model: verify what was proposed),
    every allowed draft whenever they all fit."""
    caps = bucket_caps(num_drafts, active, bucket)
    budget = bucket - jnp.sum(active).astype(jnp.int32)
    batch, gamma = confidence.shape
    top = allocate_top_k(confidence[:, :per_request_rows(batch, gamma, bucket) - 1], caps, budget)
    return jnp.where(jnp.sum(caps) <= budget, caps, top) if take_all else top


def profile_buckets(batch: int, gamma: int) -> tuple[int, ...]:
    """The buckets a round-cost profile times: batch + d rows for every draft count d up to batch·γ when that
    is at most 16 (every width at batch 1), else d = 0..8 then steps of ×1.5 and batch·γ itself."""
    most = batch * gamma
    if most <= 16:
        drafts = list(range(most + 1))
    else:
        drafts, d = list(range(9)), 8.0
        while (d := d * 1.5) < most:
            drafts.append(int(round(d)))
        drafts.append(most)
    return tuple(batch + d for d in drafts)


def efficient_buckets(buckets: tuple[int, ...], costs: tuple[float, ...], max_buckets: int = 5
                      ) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The buckets worth compiling: the smallest, the largest, and those that cost less than every larger one
    (a bucket that costs as much as a larger one is never the best choice), at most `max_buckets` of them (the
    ends and the ones with the largest cost steps to their next larger neighbour). Raises ValueError on
    mismatched, unsorted or non-positive input."""
    if len(buckets) != len(costs) or not buckets:
        raise ValueError(f"one cost per bucket needed, got {len(buckets)} buckets and {len(costs)} costs")
    if list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"buckets must be strictly increasing positive row counts, got {buckets}")
    if any(not np.isfinite(c) or c <= 0 for c in costs):
        raise ValueError(f"costs must be positive, got {costs}")
    keep = [len(buckets) - 1]
    for i in range(len(buckets) - 2, -1, -1):
        if costs[i] < costs[keep[-1]] or i == 0:
            keep.append(i)
    keep = sorted(set(keep))
    if len(keep) > max_buckets:  # keep the ends and the interior buckets that save the most against the next one
        inner = keep[1:-1]
        saving = {i: costs[keep[keep.index(i) + 1]] - costs[i] for i in inner}
        inner = sorted(sorted(inner, key=lambda i: -saving[i])[:max_buckets - 2])
        keep = [keep[0]] + inner + [keep[-1]]
    return tuple(buckets[i] for i in keep), tuple(float(costs[i]) for i in keep)


def proposal_lengths(confidence: jax.Array, threshold: jax.Array) -> jax.Array:
    """Static-threshold truncation: index of the first k with c_k < threshold (G if none, or threshold <= 0).
    confidence [B, G]; threshold: a scalar or one per request [B]. The one static-threshold rule (the jitted
    loop, the engine and the offline threshold sweep all call it)."""
    g = confidence.shape[1]
    threshold = jnp.reshape(threshold, (-1, 1)) if jnp.ndim(threshold) else threshold
    low = (confidence < threshold) & (threshold > 0)
    return jnp.where(low.any(1), jnp.argmax(low, axis=1), g).astype(jnp.int32)

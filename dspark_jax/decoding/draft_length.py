"""Hardware-aware draft length for the jitted speculative loop: each round verifies one flat bucket of T
rows (`models.layout`): every active request's anchor plus T − n_active drafts, T chosen from a few compiled
buckets to maximise the expected progress of the batch per unit of round cost (DSpark §5's scheduler objective
Θ = τ · SPS).

The loop decodes a static batch: it ends when its slowest request ends, so a round's progress is how far it
brings the request with the most tokens still to generate, not the batch's total of committed tokens (which
DSpark §5.2's top-K allocation maximises, and which the serving engine, whose slots refill, maximises with
`allocate_top_k`). With R_b tokens left for request b, slack_b = max R − R_b and g_b = 1 + E[X_b] its expected
committed tokens (X_b accepted drafts), the objective (`objective="fluid"`, the default) is
min_b (slack_b + g_b): where the longest remaining request stands after the round if every request commits its
expectation. Over the many rounds of a request the committed counts average out — and drafts go first to the
requests furthest behind (`allocate_by_level`: lowest slack + expected accepted drafts so far), so a request that
fell behind catches up in the next rounds. The exact one-round value 1 + E[min_b (slack_b + X_b)]
(`completion_gain`, `objective="one_round"`) is myopic: from level requests it counts a round only if every
request accepts, and a batch never drafts (`benchmarks/schedule_sim.py`: batch 8, lookup, humaneval 1.30x an
all-plain loop with "fluid", 1.00x with "one_round"; session 12). `objective="throughput"` is §5.2's mean
committed tokens per request with top-K allocation (no completion: 0.76x on mbpp). At batch 1 all three are
τ itself: 1 + Σ_j a_j.

Notation: c [B, G] calibrated per-position confidences, a_{b,j} = Π_{i<=j} c_{b,i} = P(X_b >= j) for the drafts
verified (requests independent); request b proposed n_b drafts; a round at bucket T costs cost(T) (seconds, or
relative — only ratios matter). At batch 1 a bucket is the verification width (anchor + drafts).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def survival(confidence: jax.Array) -> jax.Array:
    """a_{b,j} = Π_{i<=j} c_{b,i} [B, G], confidences clipped to [0, 1]."""
    return jnp.cumprod(jnp.clip(confidence.astype(jnp.float32), 0.0, 1.0), axis=1)


def _take_best(score: jax.Array, allowed: jax.Array, budget: jax.Array) -> jax.Array:
    """[R] how many of each row's allowed entries are among the `budget` allowed entries of highest score
    (ties → lower position, then lower row). score [R, G] must not increase along a row, so the taken entries
    of a row are a prefix."""
    r_n, g = score.shape
    score = jnp.where(allowed, score, -jnp.inf)
    order = jnp.argsort(-jnp.transpose(score).reshape(-1), stable=True)  # position-major: ties to lower positions
    rank = jnp.zeros((r_n * g,), jnp.int32).at[order].set(jnp.arange(r_n * g, dtype=jnp.int32))
    rank = jnp.transpose(rank.reshape(g, r_n))
    return ((rank < budget) & allowed).sum(1).astype(jnp.int32)


def allocate_top_k(confidence: jax.Array, max_draft: jax.Array, budget: jax.Array) -> jax.Array:
    """The `budget` drafts with the highest prefix survival a_{r,j} (ties to lower positions), within
    per-request caps max_draft [R]; drafts with a = 0 are never taken. confidence [R, G]. Returns ℓ [R] int32
    (DSpark §5.2's production variant: the device fills the budget by fresh survival ranking).

    Lossless: whether (r, j) is admitted depends on a_{r,j} (known before x_{r,j} is drawn), other requests,
    and the budget; a_{r,j'} for j' > j are never ranked above a_{r,j}, so x_{r,j} cannot influence it."""
    a = survival(confidence)
    allowed = (jnp.arange(a.shape[1])[None] < max_draft[:, None]) & (a > 0)
    return _take_best(a, allowed, budget)


def allocate_by_level(confidence: jax.Array, max_draft: jax.Array, budget: jax.Array, slack: jax.Array) -> jax.Array:
    """Water-filling: the `budget` drafts of lowest level slack_r + Σ_{i<j} a_{r,i} (how far request r would
    be ahead of the slowest one with its drafts before j accepted as expected; ties to lower positions), within
    per-request caps max_draft [R]; drafts with a = 0 are never taken. confidence [R, G], slack [R] (≥ 0).
    Returns ℓ [R] int32. Lossless as `allocate_top_k`: draft j's level reads only a_{r,i<j}."""
    a = survival(confidence)
    level = slack[:, None].astype(jnp.float32) + jnp.cumsum(a, axis=1) - a
    allowed = (jnp.arange(a.shape[1])[None] < max_draft[:, None]) & (a > 0)
    return _take_best(-level, allowed, budget)


def slack_of(active: jax.Array, remaining: jax.Array) -> jax.Array:
    """[B] slack_b = max R − R_b over active requests (R: remaining [B] tokens each may still commit); 0 when
    inactive."""
    lead = jnp.max(jnp.where(active, remaining, 0))
    return jnp.where(active, lead - remaining, 0).astype(jnp.int32)


def expected_committed(confidence: jax.Array, verified: jax.Array, remaining: jax.Array) -> jax.Array:
    """[B] g_b = 1 + Σ_{j <= min(verified_b, R_b − 1)} a_{b,j}: the expected tokens request b commits in a round
    verifying verified[b] drafts (accepted drafts beyond its remaining tokens are cut). confidence [B, G]."""
    a = survival(confidence)
    limit = jnp.minimum(verified, remaining - 1)
    return 1.0 + jnp.sum(jnp.where(jnp.arange(a.shape[1])[None] < limit[:, None], a, 0.0), axis=1)


def fluid_gain(confidence: jax.Array, verified: jax.Array, active: jax.Array, remaining: jax.Array) -> jax.Array:
    """min over active b of slack_b + g_b (`expected_committed`): how far the longest remaining request moves
    if every request commits its expected tokens (the default objective; module docstring). Inactive
    requests do not count; 0 when none is active. Shapes as in `completion_gain`."""
    score = slack_of(active, remaining) + expected_committed(confidence, verified, remaining)
    return jnp.where(active.any(), jnp.min(jnp.where(active, score, jnp.inf)), 0.0).astype(jnp.float32)


def throughput_gain(confidence: jax.Array, verified: jax.Array, active: jax.Array, remaining: jax.Array) -> jax.Array:
    """Mean g_b over active requests (DSpark §5.2: committed tokens per request; blind to which request
    finishes last). Shapes as in `completion_gain`."""
    n = jnp.sum(active)
    return (jnp.sum(jnp.where(active, expected_committed(confidence, verified, remaining), 0.0)) /
            jnp.maximum(n, 1)).astype(jnp.float32)


def completion_gain(confidence: jax.Array, verified: jax.Array, active: jax.Array, remaining: jax.Array) -> jax.Array:
    """Expected tokens by which a round verifying verified[b] drafts per request shortens the longest
    remaining request (the exact one-round value, objective "one_round"):
    1 + E[min_b (slack_b + X_b)] = 1 + Σ_{k>=1} Π_b P(X_b >= k − slack_b), with
    P(X_b >= m) = a_{b,m} for 1 <= m <= min(verified_b, R_b − 1) (accepted drafts beyond a request's remaining
    tokens are cut), 1 for m <= 0, else 0. Inactive requests do not count. At batch 1: 1 + Σ_{j<=ℓ} a_j.
    confidence [B, G], verified [B], active [B] bool, remaining [B] tokens. Returns a float32 scalar."""
    a = survival(confidence)
    g = a.shape[1]
    slack = slack_of(active, remaining)
    m = jnp.arange(1, g + 1, dtype=jnp.int32)[:, None] - slack[None]  # [G, B]: drafts needed for level k
    limit = jnp.minimum(verified, remaining - 1)[None]
    at_m = jnp.take_along_axis(jnp.transpose(a), jnp.clip(m - 1, 0, g - 1), axis=0)
    p = jnp.where(m <= 0, 1.0, jnp.where(m <= limit, at_m, 0.0))
    p = jnp.where(active[None], p, 1.0)
    return jnp.where(active.any(), 1.0 + jnp.prod(p, axis=1).sum(), 0.0).astype(jnp.float32)


GAINS = {"fluid": fluid_gain, "one_round": completion_gain, "throughput": throughput_gain}


def check_objective(objective: str) -> None:
    """Raises ValueError naming the known objectives for any other."""
    if objective not in GAINS:
        raise ValueError(f"unknown draft-length objective {objective!r}: one of {sorted(GAINS)}")


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


def verified_drafts(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array, remaining: jax.Array,
                    bucket: int, take_all: bool, objective: str = "fluid") -> jax.Array:
    """[B] drafts each request verifies in a bucket of `bucket` rows (within `bucket_caps`): water-filling from
    the slowest request (`allocate_by_level`; objective "throughput": `allocate_top_k`) — or, with `take_all`
    (no cost model: verify what was proposed), every allowed draft whenever they all fit (else the
    water-filling)."""
    caps = bucket_caps(num_drafts, active, bucket)
    budget = bucket - jnp.sum(active).astype(jnp.int32)
    batch, gamma = confidence.shape
    conf = confidence[:, :per_request_rows(batch, gamma, bucket) - 1]
    if objective == "throughput":
        chosen = allocate_top_k(conf, caps, budget)
    else:
        chosen = allocate_by_level(conf, caps, budget, slack_of(active, remaining))
    return jnp.where(jnp.sum(caps) <= budget, caps, chosen) if take_all else chosen


def bucket_gains(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array, remaining: jax.Array,
                 buckets: tuple[int, ...], objective: str = "fluid", scale: jax.Array | float = 1.0) -> jax.Array:
    """[len(buckets)] float32 the objective's gain (`GAINS`) of this round at each bucket (drafts by `verified_drafts`),
    each gain g counted as 1 + scale · (g − 1): the share of the progress beyond a plain round's that is trusted
    (`speculative._Rounds.progress_scale`; 1: all). 1 where a bucket verifies no draft. Shapes as in `choose_bucket`."""
    check_objective(objective)
    gain = GAINS[objective]
    gains = jnp.stack([gain(confidence, verified_drafts(confidence, num_drafts, active, remaining, t, take_all=False,
                                                        objective=objective), active, remaining)
                       for t in buckets])
    return (1.0 + scale * (gains - 1.0)).astype(jnp.float32)


def bucket_rates(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array, remaining: jax.Array,
                 buckets: tuple[int, ...], costs: tuple[float, ...], objective: str = "fluid",
                 scale: jax.Array | float = 1.0) -> jax.Array:
    """[len(buckets)] each bucket's gain (`bucket_gains`) per unit cost up to the covering bucket, −inf beyond it
    (larger buckets verify nothing more). A plain round's rate is 1 / its cost. Shapes as in `choose_bucket`."""
    return _rates(bucket_gains(confidence, num_drafts, active, remaining, buckets, objective, scale), costs,
                  num_drafts, active, buckets)


def _rates(gains: jax.Array, costs, num_drafts: jax.Array, active: jax.Array, buckets: tuple[int, ...]) -> jax.Array:
    """gains / costs (float32) up to the covering bucket, −inf beyond it (`bucket_rates`)."""
    cover = covering_bucket(num_drafts, active, buckets)
    return jnp.where(jnp.arange(len(buckets)) <= cover, gains / jnp.asarray(costs, jnp.float32), -jnp.inf)


def gated_choice(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array, remaining: jax.Array,
                 buckets: tuple[int, ...], costs, plain_cost: float, objective: str = "fluid",
                 scale: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(index into `buckets` of the largest `bucket_rates`, whether a drafted round there pays): it pays when it
    expects progress beyond a plain round's (gain > 1) at a better rate than a plain round's 1 / plain_cost, decided as
    gain · plain_cost > cost in float32. A round that verifies no draft never pays: its cost is at least a plain
    round's (`round_costs.RoundTimings.costs` clips it there), and where the clip made them equal, comparing a
    float32 1 / cost with a float64 1 / plain_cost broke the tie by rounding — into drafted rounds that verify
    nothing, every round of a batch-8 lookup run (BENCHMARKS.md "Session 53"). costs: [len(buckets)] seconds (a
    tuple or an array); other arguments as in `choose_bucket`. Lossless as `choose_bucket`."""
    return gated_rates(confidence, num_drafts, active, remaining, buckets, costs, plain_cost, objective, scale)[1:]


def gated_rates(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array, remaining: jax.Array,
                buckets: tuple[int, ...], costs, plain_cost: float, objective: str = "fluid",
                scale: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(`bucket_rates` [len(buckets)], and `gated_choice`'s choice and whether it pays) from one evaluation of the
    gains. Arguments as in `gated_choice`."""
    costs = jnp.asarray(costs, jnp.float32)
    gains = bucket_gains(confidence, num_drafts, active, remaining, buckets, objective, scale)
    rates = _rates(gains, costs, num_drafts, active, buckets)
    choice = jnp.argmax(rates).astype(jnp.int32)
    pays = (gains[choice] > 1.0) & (gains[choice] * jnp.float32(plain_cost) > costs[choice])
    return rates, choice, pays


def choose_bucket(confidence: jax.Array, num_drafts: jax.Array, active: jax.Array, remaining: jax.Array,
                  buckets: tuple[int, ...], costs: tuple[float, ...] | None, objective: str = "fluid",
                  scale: jax.Array | float = 1.0) -> jax.Array:
    """Index into `buckets` of this round's verification bucket.

    costs None: the covering bucket (verify everything proposed). Otherwise the bucket with the largest
    `bucket_rates` under `objective` and `scale` (ties → the smaller one). Lossless: the choice reads only confidences,
    proposal lengths and token counts, known before any draft is verified.
    Shapes: confidence [B, G], num_drafts [B] (0..G), active [B] bool, remaining [B] tokens each request may still
    commit; buckets ascending, buckets[0] >= B."""
    if costs is None:
        return covering_bucket(num_drafts, active, buckets)
    return jnp.argmax(bucket_rates(confidence, num_drafts, active, remaining, buckets, costs,
                                   objective, scale)).astype(jnp.int32)


def budget_confidence(fresh: jax.Array, stale: jax.Array, sampled: jax.Array) -> jax.Array:
    """The confidences a round's bucket is chosen from [B, G]. A request whose drafts were sampled (T > 0, model
    drafts) reads position 1 fresh (c_1 depends on no token drawn this round) and later positions from `stale`
    (its last drafted round's confidences; negative where it has none: c_1 repeated): with a Markov head c_k
    depends on x_{k−1}, so a bucket chosen from fresh c_2.. would decide whether x_1 is verified from x_1 itself —
    DSpark Appendix A's selection bias. Deterministic drafts (lookup, greedy argmax) are functions of the past:
    fresh throughout. Rows of the same bucket are then filled from fresh confidences (`verified_drafts`), which
    is lossless (§5.2's production variant). sampled [B] bool."""
    later = jnp.arange(fresh.shape[1])[None] >= 1
    stale = jnp.where(stale < 0, fresh[:, :1], stale)
    return jnp.where(sampled[:, None] & later, stale, fresh)


def profile_buckets(batch: int, gamma: int) -> tuple[int, ...]:
    """The buckets (rows) a round-cost profile times: batch + d rows for every draft count d up to batch·γ when
    that is at most 16 (every width at batch 1); else d = 0..8, then every multiple of 8 rows up to 64 rows (a
    CPU's vector units and GEMM tiles work in groups of 8 rows, so a round's cost steps there: the rows between
    two multiples cost nearly as much as the next one), then steps of ×1.5, and batch·(γ + 1) itself."""
    most = batch * (gamma + 1)
    if batch * gamma <= 16:
        return tuple(range(batch, most + 1))
    rows = list(range(batch, batch + 9))
    r = (rows[-1] // 8 + 1) * 8
    while r < min(64, most):
        rows.append(r)
        r += 8
    x = float(rows[-1])
    while (x := x * 1.5) < most:
        rows.append(int(round(x)))
    rows.append(most)
    return tuple(sorted(set(rows)))


def undominated_buckets(costs: tuple[float, ...]) -> list[int]:
    """Ascending indices of the buckets worth compiling at all: the smallest, and every one that costs less than
    every larger one (a bucket costing as much as a larger one is never the best choice). costs [n] per bucket,
    ascending bucket sizes."""
    keep = [len(costs) - 1]
    for i in range(len(costs) - 2, -1, -1):
        if costs[i] < costs[keep[-1]] or i == 0:
            keep.append(i)
    return sorted(set(keep))


def efficient_buckets(buckets: tuple[int, ...], costs: tuple[float, ...], max_buckets: int = 5
                      ) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The buckets worth compiling: the smallest, the largest, and among those that cost less than every larger
    one (a bucket that costs as much as a larger one is never the best choice) the set of at most `max_buckets`
    that wastes least on rounding up: a round whose rows fill profiled bucket i runs at the smallest kept bucket
    holding them, so the kept set minimises Σ_i (cost(kept bucket of i) / cost_i − 1) over every profiled bucket
    (exact, by dynamic programming over the candidates). Before session 33 the interior buckets kept were those
    with the largest absolute cost step to their next larger neighbour, which favoured large buckets: at batch
    8, γ 15 the loop compiled (8, 56, 84, 126, 128), so a drafted round verified 48 drafts or none (BENCHMARKS.md
    "Session 33"). Raises ValueError on mismatched, unsorted or non-positive input."""
    if len(buckets) != len(costs) or not buckets:
        raise ValueError(f"one cost per bucket needed, got {len(buckets)} buckets and {len(costs)} costs")
    if list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"buckets must be strictly increasing positive row counts, got {buckets}")
    if any(not np.isfinite(c) or c <= 0 for c in costs):
        raise ValueError(f"costs must be positive, got {costs}")
    if max_buckets < 1 or (max_buckets < 2 and len(buckets) > 1):
        raise ValueError(f"max_buckets must keep the smallest and the largest bucket (>= 2), got {max_buckets}")
    cand = undominated_buckets(costs)

    def waste(lo: int, hi: int) -> float:  # profiled buckets lo+1..hi rounded up to bucket hi
        return sum(costs[hi] / costs[i] - 1.0 for i in range(lo + 1, hi + 1))

    keep_count = min(max_buckets, len(cand))
    # best[k][j]: least waste over buckets 0..cand[j] keeping k candidates, the last of them cand[j]
    best = [[np.inf] * len(cand) for _ in range(keep_count + 1)]
    came = [[-1] * len(cand) for _ in range(keep_count + 1)]
    best[1][0] = 0.0
    for k in range(2, keep_count + 1):
        for j in range(1, len(cand)):
            for prev in range(j):
                total = best[k - 1][prev] + waste(cand[prev], cand[j])
                if total < best[k][j]:
                    best[k][j], came[k][j] = total, prev
    k, j = keep_count, len(cand) - 1
    keep = []
    while j >= 0 and k >= 1:
        keep.append(cand[j])
        j, k = came[k][j], k - 1
    keep = sorted(keep)
    return tuple(buckets[i] for i in keep), tuple(float(costs[i]) for i in keep)


def proposal_lengths(confidence: jax.Array, threshold: jax.Array) -> jax.Array:
    """Static-threshold truncation: index of the first k with c_k < threshold (G if none, or threshold <= 0).
    confidence [B, G]; threshold: a scalar or one per request [B]. The one static-threshold rule (the jitted
    loop, the engine and the offline threshold sweep all call it)."""
    g = confidence.shape[1]
    threshold = jnp.reshape(threshold, (-1, 1)) if jnp.ndim(threshold) else threshold
    low = (confidence < threshold) & (threshold > 0)
    return jnp.where(low.any(1), jnp.argmax(low, axis=1), g).astype(jnp.int32)

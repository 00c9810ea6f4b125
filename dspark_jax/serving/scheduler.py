"""How many draft tokens each request verifies: DSpark's hardware-aware prefix scheduler (paper Alg. 1 and
its production variant, §5.2) and the static policies it is compared with.

Notation: c [R, G] per-position confidences of R active requests (c_k = P(slot k accepted | earlier accepted)),
a_{r,j} = Π_{i<=j} c_{r,i} the prefix survival; verifying ℓ_r drafts costs 1 + ℓ_r tokens and is expected to
commit 1 + Σ_{j<=ℓ_r} a_{r,j}. SPS(B) is the measured steps/s at B verified tokens (a `CostTable`).
The device side of the production variant, `allocate_top_k`, lives in `decoding.draft_length` (the jitted loop
uses it too).
"""
from __future__ import annotations

import numpy as np

from dspark_jax.serving.cost_table import CostTable


def survival(confidence: np.ndarray) -> np.ndarray:
    """a_{r,j} = Π_{i<=j} c_{r,i}, [R, G]."""
    return np.cumprod(np.clip(np.asarray(confidence, np.float64), 0.0, 1.0), axis=1)


def _greedy_path(confidence: np.ndarray, max_draft: np.ndarray):
    """Candidates (r, j) with a_{r,j} > 0 and j < max_draft[r], sorted by survival descending (ties: lower j
    first, so every request's admitted set stays a prefix)."""
    a = survival(confidence)
    r_idx, j_idx = np.nonzero((a > 0) & (np.arange(a.shape[1])[None] < np.asarray(max_draft)[:, None]))
    order = np.lexsort((j_idx, -a[r_idx, j_idx]))
    return r_idx[order], j_idx[order], a[r_idx[order], j_idx[order]]


def schedule_synchronous(confidence: np.ndarray, table: CostTable, max_draft: np.ndarray | None = None,
                         early_stop: bool = True, base_tokens: int = 0) -> np.ndarray:
    """Algorithm 1: admit drafts in descending survival while Θ = τ* · SPS(B) improves; stop at the first
    non-improvement (early stop — lossless). `early_stop=False` scans the whole path and keeps the global
    best: better on jagged SPS curves but biased when run on fresh confidences (paper App. A); it is here for
    the production variant (on stale confidences) and for the test that shows the bias. `base_tokens`: tokens
    other requests (on static policies) already put in the same step."""
    confidence = np.asarray(confidence, np.float64)
    r_n, g = confidence.shape
    max_draft = np.full(r_n, g) if max_draft is None else np.minimum(np.asarray(max_draft), g)
    lengths = np.zeros(r_n, np.int64)
    best_lengths = lengths.copy()
    batch, tau = r_n + base_tokens, float(r_n)
    best = tau * table.sps(batch)
    for r, j, a in zip(*_greedy_path(confidence, max_draft)):
        lengths[r] = j + 1
        batch += 1
        tau += a
        theta = tau * table.sps(batch)
        if theta > best:
            best, best_lengths = theta, lengths.copy()
        elif early_stop:
            break
    return best_lengths


def expected_throughput(confidence: np.ndarray, lengths: np.ndarray, table: CostTable, base_tokens: int = 0) -> float:
    """Θ = τ · SPS(B): expected committed tokens per second of one step verifying `lengths` drafts per request
    (B = requests + base_tokens + Σ lengths, τ = requests + Σ_r Σ_{j<ℓ_r} a_{r,j})."""
    a = survival(confidence)
    lengths = np.asarray(lengths)
    tau = len(lengths) + float((a * (np.arange(a.shape[1])[None] < lengths[:, None])).sum())
    return tau * table.sps(len(lengths) + base_tokens + int(lengths.sum()))


def drafting_pays(confidence: np.ndarray, lengths: np.ndarray, table: CostTable, base_tokens: int = 0) -> bool:
    """Whether a draft step with these lengths is expected to commit more tokens per second than the
    draft-free step (target only: one token per request at `table.plain_steps_per_s`). Always True without a
    profiled draft-free step; never with no draft to verify (such a step does the draft-free step's work and the
    drafter's: a profile that timed it faster than the draft-free step measured noise)."""
    if table.plain_steps_per_s is None:
        return True
    if not np.asarray(lengths).sum():
        return False
    return expected_throughput(confidence, lengths, table, base_tokens) > len(lengths) * table.plain_steps_per_s


def capacity(confidence: np.ndarray, table: CostTable, max_draft: np.ndarray | None = None,
             base_tokens: int = 0) -> int:
    """Production variant, host side: the verification budget K (draft tokens) from the global search without
    early stop over (stale) confidences; the device then fills K by fresh survival ranking."""
    return int(schedule_synchronous(confidence, table, max_draft, early_stop=False, base_tokens=base_tokens).sum())


def fixed_lengths(num_requests: int, gamma: int, max_draft: np.ndarray | None = None) -> np.ndarray:
    """Static fixed-γ policy."""
    out = np.full(num_requests, gamma, np.int64)
    return out if max_draft is None else np.minimum(out, max_draft)


def threshold_lengths(confidence: np.ndarray, threshold: float | np.ndarray,
                      max_draft: np.ndarray | None = None) -> np.ndarray:
    """Static-threshold policy: verify drafts up to the first position whose confidence c_k < threshold."""
    c = np.asarray(confidence)
    low = c < np.asarray(threshold).reshape(-1, 1)
    out = np.where(low.any(1), np.argmax(low, 1), c.shape[1])
    return out if max_draft is None else np.minimum(out, max_draft)


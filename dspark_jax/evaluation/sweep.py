"""Static confidence-threshold sweep computed offline from one run with threshold 0 (paper Fig. 5); why this
is exact per round is `METHOD_NOTE`."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from dspark_jax.decoding.draft_length import proposal_lengths
from dspark_jax.evaluation.records import RoundRecords

DEFAULT_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(10))

METHOD_NOTE = (
    "A threshold t cuts a proposal at the first position with c_k < t (as the decoding loop does). Whether draft "
    "token k is accepted depends only on the context, tokens 1..k and their acceptance draws, never on later "
    "tokens, so for every recorded round the verified length min(cut, proposed) and the accepted count "
    "min(A, cut) are exactly what that round would give under threshold t. Caveat: a real run at threshold t "
    "commits fewer tokens per round, so its later rounds start at other positions; the sweep aggregates over "
    "the threshold-0 run's rounds (exact per round, not a replay of the thresholded run).")


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    threshold: float
    verified_per_round: float  # draft tokens sent to verification per round (accepted + rejected)
    accepted_per_round: float
    rejected_per_round: float
    acceptance_rate: float  # Σ accepted / Σ verified draft tokens
    accept_length: float  # accepted + 1 (the target's own token) per round, stop tokens and budget ignored


def cut_lengths(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """[N] the decoding loop's proposal length under a static threshold (its own function, on the host)."""
    if len(confidence) == 0:
        return np.zeros(0, np.int64)
    return np.asarray(proposal_lengths(jnp.asarray(confidence, jnp.float32), jnp.float32(threshold)), np.int64)


def threshold_sweep(records: RoundRecords, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[SweepPoint]:
    """One point per threshold (each must be in [0, 1]); thresholds below the recorded run's own cut only
    reproduce that run's lengths (a proposal cannot be longer than what was verified)."""
    points = []
    n_rounds = max(len(records), 1)
    for t in thresholds:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"thresholds must be in [0, 1], got {t}")
        verified = np.minimum(cut_lengths(records.confidence, t), records.proposed)
        accepted = np.minimum(records.accepted, verified)
        total_v, total_a = int(verified.sum()), int(accepted.sum())
        points.append(SweepPoint(threshold=float(t), verified_per_round=total_v / n_rounds,
                                 accepted_per_round=total_a / n_rounds,
                                 rejected_per_round=(total_v - total_a) / n_rounds,
                                 acceptance_rate=total_a / total_v if total_v else float("nan"),
                                 accept_length=total_a / n_rounds + 1.0))
    return points

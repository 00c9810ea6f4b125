"""Acceptance metrics of speculative decoding (spec §3.5, paper Table 1 and Fig. 2), pooled over rounds.

Positions k are 1-based (k = 1 is the first draft token after the anchor). Ratios with an empty
denominator are NaN.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dspark_jax.evaluation.records import RoundRecords


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def accept_length(records: RoundRecords) -> float:
    """τ pooled over rounds: Σ committed tokens / Σ rounds (bonus included; the number reported)."""
    return _ratio(records.committed.sum(), len(records))


def per_request_accept_length(records: RoundRecords) -> float:
    """Mean over requests of each request's own τ: weights short requests like long ones, so it differs from
    the pooled τ. Not reported; kept to show the difference."""
    per_request = [records.committed[records.request == r].mean() for r in np.unique(records.request)]
    return float(np.mean(per_request)) if per_request else float("nan")


def mean_proposed(records: RoundRecords) -> float:
    """Draft tokens verified per round."""
    return _ratio(records.proposed.sum(), len(records))


def verify_rate(records: RoundRecords) -> float:
    """Share of verified positions that end up committed: Σ committed / Σ (proposed + 1)."""
    return _ratio(records.committed.sum(), (records.proposed + 1).sum())


def model_rounds(records: RoundRecords) -> int:
    """Rounds that ran the drafter model's forward (the rest: prompt lookup's draft alone, a hybrid's rounds that
    skipped its model, plain rounds) — what a round costs depends on it."""
    return int(records.model_forward.sum())


def prefix_survival(records: RoundRecords) -> np.ndarray:
    """[G]: P(first k draft tokens all accepted) = #rounds with A >= k / #rounds that verified position k."""
    k = np.arange(1, records.block_size + 1)[None]
    survived = (records.accepted[:, None] >= k).sum(0)
    verified = (records.proposed[:, None] >= k).sum(0)
    return np.array([_ratio(s, v) for s, v in zip(survived, verified)])


def reached_positions(records: RoundRecords) -> np.ndarray:
    """[G]: rounds that verified position k with tokens 1..k-1 accepted (conditional acceptance's denominator)."""
    k = np.arange(1, records.block_size + 1)[None]
    return ((records.accepted[:, None] >= k - 1) & (records.proposed[:, None] >= k)).sum(0)


def conditional_acceptance(records: RoundRecords) -> np.ndarray:
    """[G]: P(token k accepted | tokens 1..k-1 accepted) over rounds that verified position k (paper Fig. 2:
    not penalised by earlier rejections)."""
    k = np.arange(1, records.block_size + 1)[None]
    accepted = (records.accepted[:, None] >= k).sum(0)
    return np.array([_ratio(s, r) for s, r in zip(accepted, reached_positions(records))])


@dataclasses.dataclass(frozen=True)
class AcceptanceSummary:
    rounds: int
    model_rounds: int  # rounds that ran the drafter model's forward (`model_rounds`)
    accept_length: float
    mean_proposed: float
    verify_rate: float
    prefix_survival: tuple[float, ...]
    conditional_acceptance: tuple[float, ...]
    reached: tuple[int, ...]  # rounds behind each conditional acceptance


def summarize_acceptance(records: RoundRecords) -> AcceptanceSummary:
    return AcceptanceSummary(rounds=len(records), model_rounds=model_rounds(records),
                             accept_length=accept_length(records),
                             mean_proposed=mean_proposed(records), verify_rate=verify_rate(records),
                             prefix_survival=tuple(prefix_survival(records).tolist()),
                             conditional_acceptance=tuple(conditional_acceptance(records).tolist()),
                             reached=tuple(int(n) for n in reached_positions(records)))

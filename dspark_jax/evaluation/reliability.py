"""How good the confidence head's survival estimates are (spec §3.5, paper Fig. 6).

For every verified round and draft position k (only positions the target actually verified), the predicted
prefix survival a_k = Π_{i<=k} c_i is compared with the realised outcome "first k draft tokens all accepted".
Per position: ECE with equal-width bins (and its noise floor at the sample size), ROC-AUC (exact, rank based;
ties count ½) and the Brier score.
"""
from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_BINS = 20


def survival_pairs(confidence: np.ndarray, accept_flags: np.ndarray,
                   proposed: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per position k = 1..G: (predicted Π_{i<=k} c_i, realised all-first-k-accepted) over the rounds that
    verified position k. confidence, accept_flags: [N, G]; proposed: [N]."""
    cum = np.cumprod(np.asarray(confidence, np.float64), axis=1)
    flags = np.cumprod(np.asarray(accept_flags, bool), axis=1).astype(bool)  # prefix-closed already; made sure
    pairs = []
    for k in range(cum.shape[1]):
        verified = np.asarray(proposed) > k
        pairs.append((cum[verified, k], flags[verified, k]))
    return pairs


def survival_ece(confidence: np.ndarray, accept_flags: np.ndarray, proposed: np.ndarray, bins: int = DEFAULT_BINS,
                 floor_positions: int | None = None) -> tuple[list[float], list[float], list[tuple[np.ndarray, np.ndarray]]]:
    """Per position k = 1..G of the survival (`survival_pairs`; same inputs): (ECE, noise floor
    (`ece_noise_floor`) at the first `floor_positions` positions — every one when None —, the (predicted,
    realised) pairs)."""
    pairs = survival_pairs(confidence, accept_flags, proposed)
    return ([expected_calibration_error(p, y, bins) for p, y in pairs],
            [ece_noise_floor(p, bins) for p, _ in pairs[:floor_positions]], pairs)


def _bin_index(pred: np.ndarray, bins: int) -> np.ndarray:
    return np.clip((np.asarray(pred, np.float64) * bins).astype(np.int64), 0, bins - 1)


def reliability_curve(pred: np.ndarray, label: np.ndarray, bins: int = DEFAULT_BINS):
    """Per equal-width bin of [0, 1]: (mean prediction, observed rate, count); empty bins give NaN means."""
    pred, label = np.asarray(pred, np.float64), np.asarray(label, np.float64)
    idx = _bin_index(pred, bins)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(idx, pred, minlength=bins) / count
        observed = np.bincount(idx, label, minlength=bins) / count
    return mean_pred, observed, count


def expected_calibration_error(pred: np.ndarray, label: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Σ_bins |mean prediction − observed rate| · count / total (NaN without samples)."""
    if len(pred) == 0:
        return float("nan")
    mean_pred, observed, count = reliability_curve(pred, label, bins)
    full = count > 0
    return float(np.sum(np.abs(mean_pred[full] - observed[full]) * count[full]) / count.sum())


def ece_noise_floor(pred: np.ndarray, bins: int = DEFAULT_BINS, draws: int = 100, seed: int = 0) -> float:
    """The ECE a perfectly calibrated predictor with these predictions shows at this sample size: the mean ECE
    of `draws` label sets drawn Bernoulli(pred) (seeded, so reports repeat). An observed ECE near it is noise,
    not miscalibration: it falls as 1/√N (about 2 % at 4,000 rounds with 20 bins). NaN without samples."""
    pred = np.asarray(pred, np.float64)
    if len(pred) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    return float(np.mean([expected_calibration_error(pred, rng.random(len(pred)) < pred, bins)
                          for _ in range(draws)]))


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties ½ (Mann–Whitney U with mid-ranks);
    NaN unless both classes occur."""
    score, label = np.asarray(score, np.float64), np.asarray(label, bool)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), np.float64)
    sorted_scores = score[order]
    # mid-ranks: every member of a group of ties gets the mean of the group's 1-based ranks
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(score)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def brier_score(pred: np.ndarray, label: np.ndarray) -> float:
    if len(pred) == 0:
        return float("nan")
    return float(np.mean((np.asarray(pred, np.float64) - np.asarray(label, np.float64)) ** 2))


@dataclasses.dataclass(frozen=True)
class PositionReliability:
    position: int  # 1-based draft position k
    count: int  # rounds that verified position k
    ece: float
    auc: float
    brier: float
    mean_pred: float
    mean_label: float
    ece_floor: float = float("nan")  # `ece_noise_floor` of this position's predictions


def position_reliability(confidence: np.ndarray, accept_flags: np.ndarray, proposed: np.ndarray,
                         bins: int = DEFAULT_BINS) -> list[PositionReliability]:
    out = []
    for k, (pred, label) in enumerate(survival_pairs(confidence, accept_flags, proposed), 1):
        out.append(PositionReliability(
            position=k, count=len(pred), ece=expected_calibration_error(pred, label, bins),
            auc=roc_auc(pred, label), brier=brier_score(pred, label),
            mean_pred=float(pred.mean()) if len(pred) else float("nan"),
            mean_label=float(label.mean()) if len(label) else float("nan"),
            ece_floor=ece_noise_floor(pred, bins)))
    return out


def weighted_mean(rows: list[PositionReliability], field: str) -> float:
    """Count-weighted mean of a field over positions, skipping NaNs (the spec's dataset summary)."""
    vals = [(getattr(r, field), r.count) for r in rows if r.count and np.isfinite(getattr(r, field))]
    total = sum(c for _, c in vals)
    return sum(v * c for v, c in vals) / total if total else float("nan")

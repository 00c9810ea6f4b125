"""PNG figures of an evaluation (matplotlib, Agg backend): position-wise acceptance (paper Fig. 2),
threshold sweep (Fig. 5) and reliability diagrams (Fig. 6)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dspark_jax.evaluation.reliability import (DEFAULT_BINS, expected_calibration_error, reliability_curve,
                                               roc_auc)
from dspark_jax.evaluation.sweep import SweepPoint
from dspark_jax.utils.files import pyplot, save_figure

LINE_STYLES = ("-", "--", "-.", ":")


def _save(fig, path: str | Path) -> Path:
    return save_figure(fig, path, tight=True)


def plot_position_acceptance(curves: Mapping[str, Mapping[str, np.ndarray]], path: str | Path,
                             title: str = "", ylabel: str = "Cond. acceptance") -> Path:
    """curves[domain][drafter] = [G] per-position values; one panel per domain, one line per drafter."""
    plt = pyplot()
    domains = list(curves)
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.4), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for i, (drafter, curve) in enumerate(curves[domain].items()):
            curve = np.asarray(curve, float)  # distinct styles keep identical curves visible
            ax.plot(np.arange(1, len(curve) + 1), curve, marker="osD^v"[i % 5], linestyle=LINE_STYLES[i % 4],
                    markersize=7 - i % 4, label=drafter)
        g = max(len(c) for c in curves[domain].values())
        ax.set_xticks(range(1, g + 1))
        ax.set_xlim(0.5, g + 0.5)
        ax.set_title(domain.capitalize())
        ax.set_xlabel("Draft position")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_threshold_sweep(points: Mapping[str, Sequence[SweepPoint]], path: str | Path, title: str = "") -> Path:
    """points[domain] = sweep; stacked bars accepted / rejected draft tokens per round, acceptance-rate line."""
    plt = pyplot()
    domains = list(points)
    fig, axes = plt.subplots(1, len(domains), figsize=(4.4 * len(domains), 3.4), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        pts = list(points[domain])
        x = np.arange(len(pts))
        acc = [p.accepted_per_round for p in pts]
        rej = [p.rejected_per_round for p in pts]
        ax.bar(x, acc, color="tab:blue", label="accepted")
        ax.bar(x, rej, bottom=acc, color="white", edgecolor="tab:blue", hatch="//", label="rejected")
        ax.set_xticks(x, [f"{p.threshold:.1f}" for p in pts], fontsize=7)
        ax.set_title(domain.capitalize())
        ax.set_xlabel("Confidence threshold")
        twin = ax.twinx()
        rate = [p.acceptance_rate for p in pts]
        twin.plot(x, rate, color="tab:red", marker="o", label="acceptance rate")
        twin.set_ylim(0, 1.05)
        for xi, r in zip(x[[0, -1]], [rate[0], rate[-1]]):
            if np.isfinite(r):
                twin.annotate(f"{100 * r:.1f}%", (xi, r), textcoords="offset points", xytext=(0, 6), ha="center",
                              fontsize=7, color="tab:red")
    axes[0][0].set_ylabel("Draft tokens per step")
    axes[0][0].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(series: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], path: str | Path,
                     bins: int = DEFAULT_BINS, title: str = "") -> Path:
    """series[name] = per-position (predicted survival, realised) pairs, e.g. {"before": ..., "after": ...}.
    One panel per position: observed vs predicted per bin, the diagonal, and the first series' sample
    histogram shaded behind."""
    plt = pyplot()
    names = list(series)
    g = len(series[names[0]])
    cols = min(g, 4)
    rows = -(-g // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= g:
            ax.axis("off")
            continue
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        notes = []
        for i, name in enumerate(names):
            pred, label = series[name][k]
            if i == 0 and len(pred):
                counts = np.histogram(pred, edges)[0]
                ax.bar(edges[:-1], counts / counts.max(), width=1 / bins, align="edge", color="gray", alpha=0.15)
            mean_pred, observed, count = reliability_curve(pred, label, bins)
            full = count > 0
            ax.plot(mean_pred[full], observed[full], marker="o", markersize=3, label=name)
            auc = roc_auc(pred, label)
            notes.append(f"{name}: ECE {100 * expected_calibration_error(pred, label, bins):.1f}%, "
                         f"AUC {'n/a' if np.isnan(auc) else f'{auc:.3f}'}")
        ax.set_title(f"Position {k + 1}", fontsize=9)
        ax.text(0.02, 0.98, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        if k % cols == 0:
            ax.set_ylabel("Observed survival")
        if k // cols == rows - 1:
            ax.set_xlabel("Predicted survival")
    axes[0][0].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)

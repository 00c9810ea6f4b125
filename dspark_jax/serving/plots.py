"""Plots of serving measurements: the cost table, throughput vs per-user speed (paper Fig. 7), verification
budget vs concurrency (Fig. 8)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dspark_jax.utils.files import pyplot, save_figure


def plot_cost_table(table, path: str | Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(table.buckets, table.steps_per_s, "o-", label="draft+verify steps/s")
    if table.plain_steps_per_s is not None:
        ax.axhline(table.plain_steps_per_s, color="tab:gray", ls=":", label="target-alone steps/s")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_xlabel("verified tokens per step (bucket)")
    ax.set_ylabel("steps/s")
    ax2 = ax.twinx()
    ax2.plot(table.buckets, [b * s for b, s in zip(table.buckets, table.steps_per_s)], "s--", color="tab:orange",
             label="token capacity/s")
    ax2.set_ylabel("verified tokens/s")
    ax.set_title("SPS(B)" + (f" — {table.machine[:60]}" if table.machine else ""), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_load(results: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """results: rows with policy, concurrency, aggregate_tps, per_user_tps, verified_per_round."""
    plt = pyplot()
    out_dir = Path(out_dir)
    policies = list(dict.fromkeys(r["policy"] for r in results))
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in policies:
        rows = sorted((r for r in results if r["policy"] == p), key=lambda r: r["concurrency"])
        ax.plot([r["per_user_tps"] for r in rows], [r["aggregate_tps"] for r in rows], "o-", label=p)
        for r in rows:
            ax.annotate(str(r["concurrency"]), (r["per_user_tps"], r["aggregate_tps"]), fontsize=6)
    ax.set_xlabel("per-user tokens/s")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("throughput vs per-user speed (labels: concurrency)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "throughput_vs_per_user.png", dpi=120))
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in policies:
        rows = sorted((r for r in results if r["policy"] == p), key=lambda r: r["concurrency"])
        ax.plot([r["concurrency"] for r in rows], [r["verified_per_round"] for r in rows], "o-", label=p)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("draft tokens verified per request per step")
    ax.set_title("verification budget vs concurrency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "verification_budget.png", dpi=120))
    return paths

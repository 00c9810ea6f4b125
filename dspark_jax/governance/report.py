"""A governance snapshot as text tables and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from dspark_jax.utils.files import pyplot, save_figure

STATE_LEVELS = {"rolled_back": 0, "probing": 1, "speculative": 2}


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "n/a"
    if spec == "%":
        return f"{100 * value:.1f}%"
    return format(value, spec) if spec else str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _rows(groups: dict, columns: Sequence[tuple[str, Callable[[str, dict], str]]]) -> list[list[str]]:
    return [[name] + [f(name, g) for _, f in columns] for name, g in groups.items()]


def format_report(snapshot: dict) -> str:
    """Usage, speculation and cost per class and per tenant, quotas and speculation switches."""
    t = snapshot["totals"]
    classes = snapshot["classes"]
    out = [f"governance snapshot at t={snapshot['time']:.1f} (policy {snapshot.get('policy_source', '?')}); "
           f"serving cost ${snapshot['cost_per_hour_usd']:g}/h, busy {t['busy_seconds']:.1f} s, "
           f"cost ${t['cost_usd']:.4f}, {_fmt(t['cost_per_million_output_tokens_usd'], '.4f')} $/M output tokens, "
           f"{snapshot['in_flight']} in flight", ""]
    usage = [("requests", lambda n, g: _fmt(g["requests"])), ("ok", lambda n, g: _fmt(g["ok_requests"])),
             ("failed", lambda n, g: _fmt(g["failed_requests"])), ("rejected", lambda n, g: _fmt(g["rejected"])),
             ("prompt tok", lambda n, g: _fmt(g["prompt_tokens"])),
             ("output tok", lambda n, g: _fmt(g["output_tokens"])),
             ("p50 s", lambda n, g: _fmt(g["latency_p50_s"], ".3f")),
             ("p95 s", lambda n, g: _fmt(g["latency_p95_s"], ".3f")),
             ("ttft p50 s", lambda n, g: _fmt(g["first_token_p50_s"], ".3f")),
             ("tok/s/user p50", lambda n, g: _fmt(g["tokens_per_s_p50"], ".1f"))]
    spec = [("state", lambda n, g: classes.get(n, {}).get("state", "-")),
            ("rounds", lambda n, g: _fmt(g["rounds"])), ("fallback", lambda n, g: _fmt(g["fallback_rounds"])),
            ("acc/round", lambda n, g: _fmt(g["accepted_per_round"], ".2f")),
            ("tau", lambda n, g: _fmt(g["committed_per_round"], ".2f")),
            ("acceptance", lambda n, g: _fmt(g["acceptance_rate"], "%")),
            ("wasted tok", lambda n, g: _fmt(g["rejected_draft_tokens"])),
            ("busy s", lambda n, g: _fmt(g["busy_seconds"], ".1f")),
            ("cost $", lambda n, g: _fmt(g["cost_usd"], ".4f")),
            ("$/M out tok", lambda n, g: _fmt(g["cost_per_million_output_tokens_usd"], ".4f")),
            ("$/ok request", lambda n, g: _fmt(g["cost_per_successful_request_usd"], ".6f"))]
    by_class = snapshot["by_class"]
    out += ["Usage per class", format_table(["class"] + [h for h, _ in usage], _rows(by_class, usage)), ""]
    out += ["Speculation and cost per class",
            format_table(["class"] + [h for h, _ in spec], _rows(by_class, spec)), ""]
    tenant_cols = usage[:6] + spec[-3:]
    out += ["Usage and cost per tenant",
            format_table(["tenant"] + [h for h, _ in tenant_cols], _rows(snapshot["by_tenant"], tenant_cols)), ""]
    quota_rows = [[tenant, f"{q['tokens']} / {q['window_s']:g} s ({q['count']})", str(q["used"]), str(q["reserved"]),
                   str(q["remaining"])] for tenant, rows in snapshot["quotas"].items() for q in rows]
    if quota_rows:
        out += ["Quotas (current window)",
                format_table(["tenant", "quota", "used", "reserved", "remaining"], quota_rows), ""]
    switches = snapshot["switches"]
    out.append(f"Speculation switches ({len(switches)})")
    for e in switches:
        value = "" if e["value"] is None else f" [{e['metric']}={e['value']:.3f}, threshold {e['threshold']:g}]"
        out.append(f"  t={e['time']:.1f}  {e['workload_class']}: {e['from_state']} -> {e['to_state']}{value}: "
                   f"{e['reason']}")
    return "\n".join(out) + "\n"


def bar_chart(ax, names: list[str], series: dict[str, list[float | None]], ylabel: str, title: str) -> None:
    """Grouped bars on matplotlib axes `ax`: one group per name, one bar per series (None values skipped)."""
    import numpy as np
    width = 0.8 / max(1, len(series))
    x = np.arange(len(names))
    for i, (label, values) in enumerate(series.items()):
        heights = [0.0 if v is None else v for v in values]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label)
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if v is None else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)


def plot_report(snapshot: dict, output_dir: str | Path) -> list[Path]:
    """Writes accepted_per_round.png, cost_per_million_tokens.png, latency_percentiles.png and, when there were
    switches, speculation_timeline.png to `output_dir`; returns their paths."""
    plt = pyplot()
    output_dir = Path(output_dir)
    by_class = snapshot["by_class"]
    names = list(by_class)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        written.append(save_figure(fig, output_dir / name))

    def column(key: str) -> list[float | None]:
        return [by_class[n][key] for n in names]

    fig, ax = plt.subplots(figsize=(7, 4))
    bar_chart(ax, names, {"accepted draft tokens / drafted round": column("accepted_per_round"),
                      "committed tokens / round (tau)": column("committed_per_round")},
          "tokens per round", "Accepted tokens per verification round, per class")
    save(fig, "accepted_per_round.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    bar_chart(axes[0], names, {"$/M": column("cost_per_million_output_tokens_usd")}, "USD per million output tokens",
          "Cost per million output tokens, per class")
    tenants = list(snapshot["by_tenant"])
    bar_chart(axes[1], tenants, {"$/M": [snapshot["by_tenant"][t]["cost_per_million_output_tokens_usd"]
                                     for t in tenants]},
          "USD per million output tokens", "per tenant")
    save(fig, "cost_per_million_tokens.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    bar_chart(ax, names, {"p50": column("latency_p50_s"), "p95": column("latency_p95_s"),
                      "time to first token p95": column("first_token_p95_s")},
          "seconds", "Request latency percentiles, per class")
    save(fig, "latency_percentiles.png")

    if snapshot["switches"]:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        end = snapshot["time"]
        first = min(e["time"] for e in snapshot["switches"])
        start = first - max(1.0, 0.05 * (end - first))
        switched = sorted({e["workload_class"] for e in snapshot["switches"]})
        for cls in switched:
            events = [e for e in snapshot["switches"] if e["workload_class"] == cls]
            times = [start] + [e["time"] for e in events] + [end]
            levels = [STATE_LEVELS.get(events[0]["from_state"], 2)] + [STATE_LEVELS.get(e["to_state"], 2)
                                                                        for e in events]
            ax.step(times, levels + levels[-1:], where="post", label=cls)
        ax.set_yticks(list(STATE_LEVELS.values()), list(STATE_LEVELS))
        ax.set_xlabel("time (s, governor clock)")
        ax.set_title("Speculation state per class")
        ax.legend(fontsize=8)
        save(fig, "speculation_timeline.png")
    return written

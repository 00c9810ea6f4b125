"""The A/B test's minimum-metrics table (FinOps guide, phase 3), a recommendation per class, plots and files.

Metrics per class and arm (from the arm's governor snapshot; see governance.metrics and governance.costs):
    tokens per cycle      -- committed tokens per target verification round (tau; 1.0 for plain decoding)
    accepted per cycle    -- accepted draft tokens per drafted round (bonus token excluded)
    rejection rate        -- rejected / verified draft tokens (wasted verification work)
    p50 / p95 latency     -- end-to-end seconds per request
    cost per ok request   -- the arm's busy-time cost of the class / successful requests
    cost per output token -- that cost / output tokens returned to users (and per million)
    fallback rate         -- share of rounds that verified no draft (speculation off, rolled back, or the
                             scheduler / confidence floor chose none)
    incidents             -- failed + rejected requests
The same prompts run in both arms, so each class also gets a paired view: the share of prompts whose latency
fell, and the median per-prompt latency change; and, for greedy classes, whether both arms produced identical
tokens (speculative decoding must not change the output). An "all classes" row sums each arm.

Recommendation per class (`recommend`), from the measured numbers and the class's rollback rule:
    keep        -- p50 latency improves by >= min_gain, cost per output token does not rise, and the rollback
                   metric is healthy (acceptance >= threshold, or p95 <= threshold);
    narrow      -- one of the two holds (faster but unhealthy, or healthy but not faster): shorten drafts to
                   `suggested_max_draft` (about one more than the tokens accepted per cycle) and re-test;
    roll back   -- neither holds, or the governor rolled the class back during the run;
    baseline    -- the policy already disables speculation for the class.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dspark_jax.governance.ab import ARMS
from dspark_jax.governance.policy import GovernancePolicy
from dspark_jax.governance.report import bar_chart
from dspark_jax.utils.files import atomic_write_text, pyplot, save_figure

MIN_GAIN = 0.05  # a p50 latency gain smaller than this is noise at these sample sizes


def class_metrics(summary: dict) -> dict:
    """The minimum metrics of one class in one arm, from its governor snapshot summary (by_class[...])."""
    def ratio(a, b):
        return a / b if a is not None and b else None

    verified = summary["verified_draft_tokens"]
    cost = summary["cost_usd"]
    return dict(
        requests=summary["requests"], ok_requests=summary["ok_requests"],
        output_tokens=summary["output_tokens"],
        tokens_per_cycle=summary["committed_per_round"], accepted_per_cycle=summary["accepted_per_round"],
        acceptance_rate=summary["acceptance_rate"],
        rejection_rate=ratio(summary["rejected_draft_tokens"], verified),
        latency_p50_s=summary["latency_p50_s"], latency_p95_s=summary["latency_p95_s"],
        tokens_per_s_p50=summary["tokens_per_s_p50"],
        busy_s=summary["busy_seconds"], cost_usd=cost,
        cost_per_ok_request_usd=summary["cost_per_successful_request_usd"],
        cost_per_output_token_usd=ratio(cost, summary["output_tokens"]),
        cost_per_million_output_tokens_usd=summary["cost_per_million_output_tokens_usd"],
        fallback_rate=summary["fallback_round_rate"],
        speculating_requests=summary["speculative_requests"],
        incidents=summary["failed_requests"] + summary["rejected"])


def _gain(base: float | None, new: float | None) -> float | None:
    """Relative reduction from base to new (positive = better), None when undefined."""
    return 1.0 - new / base if base and new is not None else None


def recommend(policy: GovernancePolicy, name: str, base: dict, acc: dict, switches: list[dict],
              min_gain: float = MIN_GAIN) -> dict:
    """The recommendation for class `name` (see the module docstring): action, reason and the numbers used."""
    cls = policy.workload_class(name)
    latency_gain = _gain(base["latency_p50_s"], acc["latency_p50_s"])
    cost_gain = _gain(base["cost_per_output_token_usd"], acc["cost_per_output_token_usd"])
    out = dict(latency_gain=latency_gain, cost_gain=cost_gain, suggested_max_draft=None,
               rollback_metric=None, rollback_threshold=None)
    if not cls.speculate:
        return dict(out, action="baseline", reason="the policy disables speculation for this class")
    rule = cls.rollback
    if rule is not None:
        out.update(rollback_metric=rule.metric, rollback_threshold=rule.threshold)
    per_cycle = acc["accepted_per_cycle"]
    suggested = max(1, min(cls.max_draft, math.ceil(per_cycle or 0.0) + 1))
    if suggested >= cls.max_draft:
        suggested = max(1, cls.max_draft - 1)
    out["suggested_max_draft"] = suggested
    rolled = [s for s in switches if s["workload_class"] == name and s["to_state"] == "rolled_back"]
    if rolled:
        return dict(out, action="roll back", reason=f"the governor rolled the class back during the run: "
                                                    f"{rolled[-1]['reason']}")
    if rule is None:
        healthy, metric_text = True, "no rollback rule"
    elif rule.metric == "acceptance":
        value = acc["acceptance_rate"]
        healthy = value is not None and value >= rule.threshold
        metric_text = f"acceptance {_pct(value)} {'>=' if healthy else '<'} rollback threshold {_pct(rule.threshold)}"
    else:
        value = acc["latency_p95_s"]
        healthy = value is not None and value <= rule.threshold
        metric_text = f"p95 {_num(value, '.2f')} s {'<=' if healthy else '>'} rollback threshold {rule.threshold:g} s"
    faster = latency_gain is not None and latency_gain >= min_gain and (cost_gain is None or cost_gain >= 0)
    speed_text = (f"p50 latency {_signed(latency_gain)} and cost per output token {_signed(cost_gain)} vs baseline "
                  f"(improvement needed: >= {min_gain:.0%} and no cost rise)")
    if faster and healthy:
        return dict(out, action="keep", reason=f"{speed_text}; {metric_text}")
    if faster or healthy:
        why = "faster, but the drafts would trip the rollback rule" if faster else \
            "drafts are accepted well enough, but speculation does not pay on this hardware"
        return dict(out, action="narrow", reason=f"{why}: {speed_text}; {metric_text}. Narrow max_draft "
                                                 f"{cls.max_draft} -> {suggested} (accepted per cycle "
                                                 f"{_num(per_cycle, '.2f')}) and re-test")
    return dict(out, action="roll back", reason=f"neither a gain at no extra cost nor healthy drafts: {speed_text}; "
                                                f"{metric_text}")


ALL = "all classes"  # the row of every request of the arm together


def ab_tables(result: dict, policy: GovernancePolicy, min_gain: float = MIN_GAIN) -> dict:
    """{class: {"baseline": metrics, "accelerated": metrics, "recommendation": {...}, "paired": {...},
    "greedy_identical": {...}}}, then ALL: {"baseline": ..., "accelerated": ..., "paired": ...} (no
    recommendation: policies are per class)."""
    out = {}
    for name in result["classes"]:
        arms = {arm: class_metrics(result["snapshots"][arm]["by_class"][name]) for arm in ARMS
                if name in result["snapshots"][arm]["by_class"]}
        if len(arms) < 2:
            continue
        out[name] = dict(arms, recommendation=recommend(policy, name, arms["baseline"], arms["accelerated"],
                                                        result["switches"], min_gain),
                         paired=paired_latency(result["requests"], name),
                         greedy_identical=_identical(result["requests"], name))
    out[ALL] = dict({arm: class_metrics(result["snapshots"][arm]["totals"]) for arm in ARMS},
                    paired=paired_latency(result["requests"], None),
                    greedy_identical=_identical(result["requests"], None))
    return out


def _pairs(records: list[dict], name: str | None) -> list[dict[str, dict]]:
    """The requests of class `name` (None: every class) that completed in both arms, by prompt."""
    by_prompt: dict[tuple[str, int], dict[str, dict]] = {}
    for r in records:
        if (name is None or r["workload_class"] == name) and r["finish_reason"] in ("stop", "length"):
            by_prompt.setdefault((r["workload_class"], r["prompt_index"]), {})[r["arm"]] = r
    return [p for p in by_prompt.values() if len(p) == len(ARMS)]


def paired_latency(records: list[dict], name: str | None) -> dict:
    """Per prompt, accelerated latency / baseline latency - 1: how many prompts got faster, and the median."""
    changes = sorted(p["accelerated"]["latency_s"] / p["baseline"]["latency_s"] - 1.0
                     for p in _pairs(records, name) if p["baseline"]["latency_s"])
    median = None if not changes else (changes[(len(changes) - 1) // 2] + changes[len(changes) // 2]) / 2
    return dict(pairs=len(changes), faster=sum(c < 0 for c in changes), median_change=median)


def _identical(records: list[dict], name: str | None) -> dict:
    """Greedy requests whose two arms produced the same tokens (lossless speculation)."""
    pairs = [p for p in _pairs(records, name) if all(x["temperature"] == 0.0 for x in p.values())]
    same = sum(p["baseline"]["tokens"] == p["accelerated"]["tokens"] for p in pairs)
    return dict(pairs=len(pairs), identical=same)


# -- formatting -----------------------------------------------------------------------------------------------
def _num(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _signed(gain: float | None) -> str:
    """A reduction as a signed change: gain 0.2 -> '-20.0%' (better), gain -0.1 -> '+10.0%' (worse)."""
    return "n/a" if gain is None else f"{-100 * gain:+.1f}%"


COLUMNS = (("requests (ok)", lambda m: f"{m['requests']} ({m['ok_requests']})"),
           ("tokens / cycle", lambda m: _num(m["tokens_per_cycle"], ".2f")),
           ("accepted / cycle", lambda m: _num(m["accepted_per_cycle"], ".2f")),
           ("rejection rate", lambda m: _pct(m["rejection_rate"])),
           ("p50 s", lambda m: _num(m["latency_p50_s"], ".2f")),
           ("p95 s", lambda m: _num(m["latency_p95_s"], ".2f")),
           ("$ / ok request", lambda m: _num(m["cost_per_ok_request_usd"], ".5f")),
           ("$ / output token", lambda m: _num(m["cost_per_output_token_usd"], ".3g")),
           ("$ / M output tokens", lambda m: _num(m["cost_per_million_output_tokens_usd"], ",.0f")),
           ("fallback rate", lambda m: _pct(m["fallback_rate"])),
           ("incidents", lambda m: str(m["incidents"])))


def format_markdown(result: dict, tables: dict, header: str = "") -> str:
    """The minimum-metrics table per class and arm, then the recommendations."""
    lines = [header] if header else []
    lines += ["| class | arm | " + " | ".join(h for h, _ in COLUMNS) + " |",
              "|---|---|" + "---|" * len(COLUMNS)]
    for name, t in tables.items():
        for arm in ARMS:
            lines.append(f"| {name} | {arm} | " + " | ".join(f(t[arm]) for _, f in COLUMNS) + " |")
    lines += ["", "| class | action | p50 latency | $ / output token | prompts faster (median change) | "
                  "greedy outputs identical | reason |", "|---|---|---|---|---|---|---|"]
    for name, t in tables.items():
        r, g, p = t.get("recommendation"), t["greedy_identical"], t["paired"]
        same = f"{g['identical']}/{g['pairs']}" if g["pairs"] else "n/a (sampled)"
        median = "n/a" if p["median_change"] is None else f"{100 * p['median_change']:+.1f}%"
        faster = f"{p['faster']}/{p['pairs']} ({median})"
        if r is None:  # the all-classes row
            base, acc = t["baseline"], t["accelerated"]
            r = dict(action="-", latency_gain=_gain(base["latency_p50_s"], acc["latency_p50_s"]),
                     cost_gain=_gain(base["cost_per_output_token_usd"], acc["cost_per_output_token_usd"]),
                     reason=f"busy time {_num(base['busy_s'], '.1f')} s baseline vs {_num(acc['busy_s'], '.1f')} s "
                            f"accelerated for the same requests")
        lines.append(f"| {name} | **{r['action']}** | {_signed(r['latency_gain'])} | {_signed(r['cost_gain'])} | "
                     f"{faster} | {same} | {r['reason']} |")
    if result["switches"]:
        lines += ["", "Speculation switches in the accelerated arm:"]
        lines += [f"- {s['workload_class']}: {s['from_state']} -> {s['to_state']}: {s['reason']}"
                  for s in result["switches"]]
    return "\n".join(lines) + "\n"


def plot_ab(tables: dict, output_dir: str | Path) -> list[Path]:
    """ab_latency.png (p50 / p95), ab_cost.png ($ per M output tokens, $ per ok request) and
    ab_tokens_per_cycle.png (tokens per cycle, rejection rate), baseline vs accelerated per class."""
    plt = pyplot()
    output_dir = Path(output_dir)
    names = list(tables)

    def col(arm: str, key: str) -> list:
        return [tables[n][arm][key] for n in names]

    def pair(key: str) -> dict:
        return {arm: col(arm, key) for arm in ARMS}

    written = []
    for filename, panels in (
            ("ab_latency.png", [("latency_p50_s", "seconds", "p50 latency"),
                                ("latency_p95_s", "seconds", "p95 latency")]),
            ("ab_cost.png", [("cost_per_million_output_tokens_usd", "USD", "cost per million output tokens"),
                             ("cost_per_ok_request_usd", "USD", "cost per successful request")]),
            ("ab_tokens_per_cycle.png", [("tokens_per_cycle", "tokens", "tokens per verification cycle"),
                                         ("rejection_rate", "share", "rejection rate of draft tokens")])):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
        for ax, (key, ylabel, title) in zip(axes, panels):
            bar_chart(ax, names, pair(key), ylabel, f"{title}: baseline vs accelerated")
        fig.tight_layout()
        written.append(save_figure(fig, output_dir / filename))
    return written


def write_ab(result: dict, policy: GovernancePolicy, output_dir: str | Path, header: str = "",
             min_gain: float = MIN_GAIN) -> list[Path]:
    """Writes ab.json (the result plus tables and recommendations), ab.md and the plots to `output_dir`,
    each atomically; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tables = ab_tables(result, policy, min_gain)
    payload = dict(result, header=header, min_gain=min_gain, tables=tables)
    paths = [atomic_write_text(output_dir / "ab.json", json.dumps(_json_safe(payload), indent=1, allow_nan=False) + "\n"),
             atomic_write_text(output_dir / "ab.md", format_markdown(result, tables, header))]
    return paths + plot_ab(tables, output_dir)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value

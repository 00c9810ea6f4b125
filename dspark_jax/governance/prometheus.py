"""Prometheus metrics of a governance snapshot, as `prometheus_client` metric families: `GovernorCollector`
for a registry that `/metrics` serves (`dspark serve`), `render_prometheus` for one snapshot's text.

Per (class, tenant) group: counters of requests, tokens, rounds, draft tokens, busy seconds and cost; gauges of
accepted tokens per round, acceptance and unit costs; summaries of latency and time to first token (quantiles
over recent requests, _sum / _count all-time). Per class: the speculation state (one series per state, 1 for the
current one), the rollback metric's rolling value and the switch counts. Per tenant: quota limit, usage and
reservations. The governance store: up, errors by operation, settlements waiting.
Undefined values (e.g. cost per token before any output) are left out.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from dspark_jax.governance.rollback import PROBING, ROLLED_BACK, SPECULATIVE

STATES = (SPECULATIVE, ROLLED_BACK, PROBING, "disabled")

# (metric name, snapshot field, help) of per-group counters and gauges.
GROUP_COUNTERS = (
    ("dspark_requests_admitted_total", "admitted", "Requests admitted."),
    ("dspark_probe_requests_total", "probe_requests", "Finished probe requests of rolled-back classes."),
    ("dspark_speculative_requests_total", "speculative_requests", "Finished requests admitted with speculation."),
    ("dspark_prompt_tokens_total", "prompt_tokens", "Prompt tokens of finished requests."),
    ("dspark_output_tokens_total", "output_tokens", "Output tokens of finished requests."),
    ("dspark_draft_tokens_verified_total", "verified_draft_tokens", "Draft tokens verified by the target."),
    ("dspark_draft_tokens_accepted_total", "accepted_draft_tokens", "Draft tokens accepted by the target."),
    ("dspark_draft_tokens_rejected_total", "rejected_draft_tokens",
     "Draft tokens verified but rejected (wasted verification work)."),
    ("dspark_committed_tokens_total", "committed_tokens", "Tokens committed by verification rounds."),
    ("dspark_busy_seconds_total", "busy_seconds", "Busy wall time attributed to the group (processor sharing)."),
    ("dspark_cost_usd_total", "cost_usd", "Serving cost attributed to the group: cost_per_hour * busy_s / 3600."),
)
GROUP_GAUGES = (
    ("dspark_accepted_tokens_per_round", "accepted_per_round", "Accepted draft tokens per drafted round."),
    ("dspark_committed_tokens_per_round", "committed_per_round", "Committed tokens per round (bonus included)."),
    ("dspark_draft_acceptance_ratio", "acceptance_rate", "Accepted / verified draft tokens."),
    ("dspark_cost_per_million_output_tokens_usd", "cost_per_million_output_tokens_usd",
     "Cost per million output tokens: cost_usd / output_tokens * 1e6."),
    ("dspark_cost_per_successful_request_usd", "cost_per_successful_request_usd",
     "Cost per successful request: cost_usd / ok_requests."),
    ("dspark_user_tokens_per_second_p50", "tokens_per_s_p50", "Median per-request output tokens / latency."),
)


class _Families:
    """Collects metric families (prometheus_client `Metric`s) from snapshot rows."""

    def __init__(self):
        self.metrics: list[Metric] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[str, dict, float | None]]):
        """One metric family; samples are (suffix, labels, value), None values skipped. Counter names carry
        their `_total` suffix here; prometheus_client's family name drops it."""
        rows = [(s, l, v) for s, l, v in samples if v is not None]
        if not rows:
            return
        metric = Metric(name.removesuffix("_total") if kind == "counter" else name, help_text, kind)
        for suffix, labels, value in rows:
            metric.add_sample(name + suffix, {k: str(v) for k, v in labels.items()}, float(value))
        self.metrics.append(metric)


def snapshot_metrics(snapshot: dict) -> list[Metric]:
    """The metric families of a governance snapshot."""
    out = _Families()
    groups = snapshot["groups"]
    gl = [dict({"class": g["class"], "tenant": g["tenant"]}) for g in groups]
    for name, key, help_text in GROUP_COUNTERS:
        out.family(name, "counter", help_text, (("", l, g[key]) for l, g in zip(gl, groups)))
    out.family("dspark_requests_finished_total", "counter", "Finished requests by outcome.",
               (("", dict(l, outcome=o), g[f"{o}_requests"]) for l, g in zip(gl, groups) for o in ("ok", "failed")))
    out.family("dspark_requests_rejected_total", "counter", "Requests rejected at admission, by reason code.",
               (("", dict(l, code=code), n) for l, g in zip(gl, groups) for code, n in g["rejections"].items()))
    out.family("dspark_verification_rounds_total", "counter", "Verification rounds: drafted, or fallback (plain "
               "decoding step, no draft).",
               (("", dict(l, kind=k), g[f"{k}_rounds"]) for l, g in zip(gl, groups) for k in ("drafted", "fallback")))
    for name, key, help_text in GROUP_GAUGES:
        out.family(name, "gauge", help_text, (("", l, g[key]) for l, g in zip(gl, groups)))
    for name, prefix, help_text in (("dspark_request_latency_seconds", "latency", "End-to-end request latency."),
                                    ("dspark_first_token_seconds", "first_token", "Time to first token.")):
        count_key = "requests" if prefix == "latency" else "first_token_count"
        samples = []
        for l, g in zip(gl, groups):
            if not g[count_key]:
                continue
            samples += [("", dict(l, quantile=q), g[f"{prefix}_p{p}_s"]) for q, p in (("0.5", 50), ("0.95", 95))]
            samples += [("_sum", l, g[f"{prefix}_sum_s"]), ("_count", l, g[count_key])]
        out.family(name, "summary", help_text, samples)

    classes = snapshot["classes"]
    out.family("dspark_speculation_state", "gauge", "Speculation state of each class (1 = current state).",
               (("", {"class": c, "state": s}, int(info["state"] == s)) for c, info in classes.items()
                for s in STATES))
    out.family("dspark_rollback_metric_value", "gauge", "Rolling value of the class's rollback metric.",
               (("", {"class": c, "metric": info["rollback"]["metric"]}, info["rollback"]["rolling_value"])
                for c, info in classes.items() if info["rollback"]))
    out.family("dspark_rollback_threshold", "gauge", "Threshold of the class's rollback rule.",
               (("", {"class": c, "metric": info["rollback"]["metric"]}, info["rollback"]["threshold"])
                for c, info in classes.items() if info["rollback"]))
    switches = Counter((e["workload_class"], e["from_state"], e["to_state"]) for e in snapshot["switches"])
    out.family("dspark_speculation_switches_total", "counter", "Speculation state switches of each class.",
               (("", {"class": c, "from": f, "to": t}, n) for (c, f, t), n in sorted(switches.items())))

    quota_rows = [(t, q) for t, rows in snapshot["quotas"].items() for q in rows]

    def ql(t: str, q: dict) -> dict:
        return dict(tenant=t, window_s=f"{q['window_s']:g}", count=q["count"])

    for name, key, help_text in (("dspark_quota_limit_tokens", "tokens", "Tenant token quota per window."),
                                 ("dspark_quota_used_tokens", "used", "Tokens charged in the current window."),
                                 ("dspark_quota_reserved_tokens", "reserved", "Tokens reserved by in-flight "
                                                                              "requests.")):
        out.family(name, "gauge", help_text, (("", ql(t, q), q[key]) for t, q in quota_rows))
    store = snapshot.get("store")  # absent in snapshots written before shared stores existed
    if store is not None:
        out.family("dspark_governance_store_up", "gauge", "1 when the last call to the governance store (quota "
                   "ledger, rollback states) succeeded.", [("", dict(kind=store["kind"]), int(store["up"]))])
        out.family("dspark_governance_store_errors_total", "counter", "Failed calls to the governance store, by "
                   "operation.", (("", dict(operation=op), n) for op, n in sorted(store["errors"].items())))
        out.family("dspark_quota_pending_settlements", "gauge", "Finished requests whose tokens wait for the store "
                   "to be charged.", [("", {}, store.get("pending_settlements"))])
    out.family("dspark_in_flight_requests", "gauge", "Admitted requests not finished yet.",
               [("", {}, snapshot["in_flight"])])
    out.family("dspark_cost_per_hour_usd", "gauge", "Configured serving cost per hour.",
               [("", {}, snapshot["cost_per_hour_usd"])])
    return out.metrics


class GovernorCollector(Collector):
    """A prometheus_client collector reading a Governor's snapshot at every scrape: register it in the
    registry `/metrics` exposes (`registry.register(GovernorCollector(governor))`)."""

    def __init__(self, governor):
        self.governor = governor

    def collect(self):
        return iter(snapshot_metrics(self.governor.snapshot()))


def render_prometheus(snapshot: dict) -> str:
    """Text exposition (format 0.0.4) of one snapshot."""
    class _Once(Collector):
        def collect(self):
            return iter(snapshot_metrics(snapshot))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Once())
    return generate_latest(registry).decode()

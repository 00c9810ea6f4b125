"""Usage counters per (workload class, tenant) and their summaries per class, per tenant and in total.

Definitions (all per group):
    verification round      -- one target forward over a request's draft (drafted) or one plain decoding step
                               (fallback: no draft, e.g. speculation off or rolled back)
    accepted_per_round      -- accepted draft tokens / drafted rounds (bonus token excluded)
    committed_per_round     -- committed tokens / all rounds (bonus included; tau)
    acceptance_rate         -- accepted draft tokens / verified draft tokens
    rejected_draft_tokens   -- verified draft tokens - accepted draft tokens (wasted verification work)
    latency / first token   -- end-to-end and time-to-first-token seconds of finished requests
    tokens_per_s            -- a request's output tokens / its end-to-end latency (per-user speed)
Percentiles (linear interpolation) are over the most recent SAMPLES_PER_GROUP finished requests of each
(class, tenant) group; counters and sums are all-time. Costs: see dspark_jax.governance.costs.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from dspark_jax.governance.costs import cost_per_million_tokens, cost_per_request, serving_cost_usd

SAMPLES_PER_GROUP = 4096
COUNTERS = ("admitted", "rejected", "requests", "ok_requests", "failed_requests", "probe_requests",
            "speculative_requests", "prompt_tokens", "output_tokens", "rounds", "drafted_rounds", "fallback_rounds",
            "verified_draft_tokens", "accepted_draft_tokens", "committed_tokens")
"""admitted / rejected -- admission decisions; requests -- finished requests (ok + failed); speculative_requests
-- finished requests admitted with speculation on; probe_requests -- of those, probes of a rolled-back class."""


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class UsageCell:
    """All-time counters and recent latency samples of one (class, tenant) group."""
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    rejections: dict[str, int] = field(default_factory=dict)  # rejection code -> count
    latency_sum_s: float = 0.0
    first_token_sum_s: float = 0.0
    first_token_count: int = 0
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=SAMPLES_PER_GROUP))
    first_token_s: deque = field(default_factory=lambda: deque(maxlen=SAMPLES_PER_GROUP))
    tokens_per_s: deque = field(default_factory=lambda: deque(maxlen=SAMPLES_PER_GROUP))

    def add_round(self, verified_draft: int, accepted: int, committed: int, drafted: bool) -> None:
        c = self.counts
        c["rounds"] += 1
        c["drafted_rounds" if drafted else "fallback_rounds"] += 1
        c["verified_draft_tokens"] += verified_draft
        c["accepted_draft_tokens"] += accepted
        c["committed_tokens"] += committed

    def add_finish(self, prompt_tokens: int, output_tokens: int, latency_s: float, first_token_s: float | None,
                   ok: bool, speculative: bool, probe: bool) -> None:
        c = self.counts
        c["requests"] += 1
        c["ok_requests" if ok else "failed_requests"] += 1
        c["speculative_requests"] += int(speculative)
        c["probe_requests"] += int(probe)
        c["prompt_tokens"] += prompt_tokens
        c["output_tokens"] += output_tokens
        self.latency_sum_s += latency_s
        self.latencies_s.append(latency_s)
        if first_token_s is not None:
            self.first_token_sum_s += first_token_s
            self.first_token_count += 1
            self.first_token_s.append(first_token_s)
        if latency_s > 0:
            self.tokens_per_s.append(output_tokens / latency_s)

    def add_rejection(self, code: str) -> None:
        self.counts["rejected"] += 1
        self.rejections[code] = self.rejections.get(code, 0) + 1


def summarize(cells: list[UsageCell], busy_seconds: float, cost_per_hour_usd: float) -> dict:
    """JSON-ready summary of a group of cells: counters, derived rates, percentiles and costs."""
    counts = dict.fromkeys(COUNTERS, 0)
    rejections: dict[str, int] = {}
    for cell in cells:
        for k, v in cell.counts.items():
            counts[k] += v
        for k, v in cell.rejections.items():
            rejections[k] = rejections.get(k, 0) + v
    lat = [x for cell in cells for x in cell.latencies_s]
    ttft = [x for cell in cells for x in cell.first_token_s]
    tps = [x for cell in cells for x in cell.tokens_per_s]

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    cost = serving_cost_usd(cost_per_hour_usd, busy_seconds)
    return dict(
        **counts,
        rejections=dict(sorted(rejections.items())),
        rejected_draft_tokens=counts["verified_draft_tokens"] - counts["accepted_draft_tokens"],
        accepted_per_round=ratio(counts["accepted_draft_tokens"], counts["drafted_rounds"]),
        committed_per_round=ratio(counts["committed_tokens"], counts["rounds"]),
        acceptance_rate=ratio(counts["accepted_draft_tokens"], counts["verified_draft_tokens"]),
        fallback_round_rate=ratio(counts["fallback_rounds"], counts["rounds"]),
        latency_sum_s=sum(c.latency_sum_s for c in cells),
        latency_p50_s=percentile(lat, 50), latency_p95_s=percentile(lat, 95),
        first_token_sum_s=sum(c.first_token_sum_s for c in cells),
        first_token_count=sum(c.first_token_count for c in cells),
        first_token_p50_s=percentile(ttft, 50), first_token_p95_s=percentile(ttft, 95),
        tokens_per_s_p50=percentile(tps, 50), tokens_per_s_mean=ratio(sum(tps), len(tps)),
        busy_seconds=busy_seconds,
        cost_usd=cost,
        cost_per_million_output_tokens_usd=cost_per_million_tokens(cost, counts["output_tokens"]),
        cost_per_successful_request_usd=cost_per_request(cost, counts["ok_requests"]),
    )

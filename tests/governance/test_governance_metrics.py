"""Usage counters, cost arithmetic, Prometheus exposition, the HTTP endpoint and snapshot files."""
from __future__ import annotations

import json
import re

import pytest

from dspark_jax.governance import GovernedRequest, Governor, RequestRejected, policy_from_dict
from dspark_jax.governance.costs import (BusyTimeAccountant, cost_per_million_tokens, cost_per_request,
                                         serving_cost_usd)
from dspark_jax.governance.metrics import percentile
from dspark_jax.governance.snapshot import read_snapshot, write_snapshot
from dspark_jax.testing.fake_clock import FakeClock

POLICY = {
    "gamma": 7, "cost_per_hour_usd": 300.0,
    "classes": {"code": {}, "chat": {}},
    "tenants": {"acme": {"classes": "*", "quotas": [{"tokens": 100000, "window_s": 3600}]},
                "beta": {"classes": ["chat"]}},
}


def test_cost_formulas_by_hand():
    assert serving_cost_usd(300.0, 3600) == 300.0
    assert serving_cost_usd(300.0, 36) == pytest.approx(3.0)
    # The guide's example: $300/h producing 100 M accepted output tokens per hour -> $3.00 per million ...
    assert cost_per_million_tokens(serving_cost_usd(300.0, 3600), 100_000_000) == pytest.approx(3.0)
    # ... and 6.6x the output from the same pool -> about $0.45 per million.
    assert cost_per_million_tokens(300.0, 660_000_000) == pytest.approx(0.4545, abs=1e-4)
    assert cost_per_request(3.0, 12) == 0.25
    assert cost_per_million_tokens(1.0, 0) is None and cost_per_request(1.0, 0) is None


def test_busy_time_is_the_union_split_equally_among_running_requests():
    acc = BusyTimeAccountant()
    acc.start("a", "g1", 0.0)
    acc.start("b", "g2", 10.0)
    acc.start("c", "g2", 20.0)
    acc.stop("a", 30.0)   # a: 10 + 10/2 + 10/3
    acc.stop("b", 40.0)   # b, c: 10/2 + 10/3 + 10/2 each (c until 40)
    acc.stop("c", 50.0)   # c alone 40-50
    acc.advance(80.0)     # idle: nothing accrues
    acc.start("d", "g1", 100.0)
    acc.stop("d", 104.0)
    assert acc.busy_seconds == pytest.approx(54.0)
    assert acc.by_group["g1"] == pytest.approx(10 + 5 + 10 / 3 + 4)
    assert acc.by_group["g2"] == pytest.approx(54.0 - (10 + 5 + 10 / 3 + 4))
    acc.stop("d", 110.0)  # stopping twice is harmless
    assert acc.busy_seconds == pytest.approx(54.0)


def test_percentile_interpolates_like_numpy():
    assert percentile([1, 2, 3, 4, 10], 50) == 3
    assert percentile([1, 2, 3, 4, 10], 95) == pytest.approx(8.8)
    assert percentile([7], 95) == 7 and percentile([], 50) is None


def feed(gov: Governor, clock: FakeClock) -> None:
    """Two overlapping requests, an idle gap, then a failed one; hand-computed totals in the test below."""
    clock.t = 0.0
    a = gov.admit(GovernedRequest(tenant="acme", workload_class="code", prompt_tokens=100))
    gov.record_start(a.request_id)
    clock.t = 10.0
    b = gov.admit(GovernedRequest(tenant="acme", workload_class="chat", prompt_tokens=50))
    gov.record_start(b.request_id)
    for verified, accepted, committed in ((7, 5, 6), (7, 7, 8), (3, 0, 1)):
        gov.record_round(a.request_id, verified_draft=verified, accepted=accepted, committed=committed)
    gov.record_round(a.request_id, verified_draft=0, accepted=0, committed=1, drafted=False)
    for _ in range(4):
        gov.record_round(b.request_id, verified_draft=4, accepted=2, committed=3)
    clock.t = 30.0
    gov.record_finish(a.request_id, prompt_tokens=100, output_tokens=200, latency_s=30.0, first_token_s=0.5)
    clock.t = 40.0
    gov.record_finish(b.request_id, prompt_tokens=50, output_tokens=100, latency_s=30.0, first_token_s=1.5)
    clock.t = 100.0
    c = gov.admit(GovernedRequest(tenant="beta", workload_class="chat", prompt_tokens=20))
    gov.record_start(c.request_id)
    clock.t = 110.0
    gov.record_finish(c.request_id, prompt_tokens=20, output_tokens=0, latency_s=10.0, ok=False)


def test_metric_counts_and_costs_match_the_fed_stats():
    clock = FakeClock()
    gov = Governor(policy_from_dict(POLICY), clock=clock)
    feed(gov, clock)
    clock.t = 200.0
    snap = gov.snapshot()
    code, chat, total = snap["by_class"]["code"], snap["by_class"]["chat"], snap["totals"]
    assert {k: code[k] for k in ("admitted", "requests", "ok_requests", "prompt_tokens", "output_tokens", "rounds",
                                 "drafted_rounds", "fallback_rounds", "verified_draft_tokens",
                                 "accepted_draft_tokens", "rejected_draft_tokens", "committed_tokens")} == dict(
        admitted=1, requests=1, ok_requests=1, prompt_tokens=100, output_tokens=200, rounds=4, drafted_rounds=3,
        fallback_rounds=1, verified_draft_tokens=17, accepted_draft_tokens=12, rejected_draft_tokens=5,
        committed_tokens=16)
    assert code["accepted_per_round"] == pytest.approx(12 / 3)
    assert code["committed_per_round"] == pytest.approx(16 / 4)
    assert code["acceptance_rate"] == pytest.approx(12 / 17)
    assert code["fallback_round_rate"] == pytest.approx(1 / 4)
    assert (chat["requests"], chat["ok_requests"], chat["failed_requests"], chat["output_tokens"]) == (2, 1, 1, 100)
    assert chat["accepted_per_round"] == 2.0 and chat["rejected_draft_tokens"] == 8
    # Busy time: union of [0,30], [10,40], [100,110] = 50 s; a: 10 alone + 20/2 shared = 20 s; b: 20; c: 10.
    assert total["busy_seconds"] == pytest.approx(50.0)
    assert code["busy_seconds"] == pytest.approx(20.0) and chat["busy_seconds"] == pytest.approx(30.0)
    # cost = $300/h * busy / 3600; per M output tokens = cost / output * 1e6; per ok request = cost / ok.
    assert total["cost_usd"] == pytest.approx(300 * 50 / 3600)  # 4.1667
    assert code["cost_usd"] == pytest.approx(300 * 20 / 3600)  # 1.6667
    assert code["cost_per_million_output_tokens_usd"] == pytest.approx(300 * 20 / 3600 / 200 * 1e6)  # 8333.33
    assert total["cost_per_million_output_tokens_usd"] == pytest.approx(300 * 50 / 3600 / 300 * 1e6)  # 13888.9
    assert chat["cost_per_successful_request_usd"] == pytest.approx(300 * 30 / 3600 / 1)  # the failed one costs too
    assert total["cost_per_successful_request_usd"] == pytest.approx(300 * 50 / 3600 / 2)
    # Latency, time to first token and per-user speed.
    assert chat["latency_p50_s"] == pytest.approx(20.0) and code["latency_p95_s"] == 30.0
    assert total["first_token_count"] == 2 and total["first_token_p50_s"] == pytest.approx(1.0)
    assert code["tokens_per_s_p50"] == pytest.approx(200 / 30)
    # Per tenant and per (class, tenant) group.
    assert snap["by_tenant"]["beta"]["failed_requests"] == 1 and snap["by_tenant"]["acme"]["output_tokens"] == 300
    assert snap["by_tenant"]["beta"]["busy_seconds"] == pytest.approx(10.0)
    assert [(g["class"], g["tenant"]) for g in snap["groups"]] == [("chat", "acme"), ("chat", "beta"),
                                                                    ("code", "acme")]
    assert snap["quotas"]["acme"][0]["used"] == 450 and snap["in_flight"] == 0
    json.dumps(snap, allow_nan=False)  # strict JSON


SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
                       r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\})? (-?[0-9.]+(?:e[-+]?[0-9]+)?)$')


def check_exposition(text: str) -> dict[str, float]:
    """Line-format check of Prometheus text exposition; returns {series: value}."""
    assert text.endswith("\n")
    types, series = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "summary") and name not in types
            types[name] = kind
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"bad exposition line: {line!r}"
        name = m.group(1)
        family = re.sub(r"_(sum|count)$", "", name) if types.get(re.sub(r"_(sum|count)$", "", name)) == "summary" \
            else name
        assert family in types, f"sample before its # TYPE: {line!r}"
        key = name + (m.group(2) or "")
        assert key not in series, f"duplicate series {key}"
        series[key] = float(m.group(3))
    return series


def test_prometheus_text_parses_and_carries_the_numbers():
    clock = FakeClock()
    gov = Governor(policy_from_dict(POLICY), clock=clock)
    feed(gov, clock)
    with pytest.raises(RequestRejected):
        gov.admit(GovernedRequest(tenant="nobody", prompt_tokens=1))
    series = check_exposition(gov.prometheus_text())
    assert series['dspark_output_tokens_total{class="code",tenant="acme"}'] == 200
    assert series['dspark_draft_tokens_rejected_total{class="code",tenant="acme"}'] == 5
    assert series['dspark_verification_rounds_total{class="code",kind="fallback",tenant="acme"}'] == 1
    assert series['dspark_requests_finished_total{class="chat",outcome="failed",tenant="beta"}'] == 1
    rejected = 'dspark_requests_rejected_total{class="<unclassified>",code="unknown_tenant",tenant="<unknown>"}'
    assert series[rejected] == 1
    assert series['dspark_cost_usd_total{class="code",tenant="acme"}'] == pytest.approx(300 * 20 / 3600)
    assert series['dspark_cost_per_million_output_tokens_usd{class="code",tenant="acme"}'] == pytest.approx(
        300 * 20 / 3600 / 200 * 1e6)
    assert series['dspark_request_latency_seconds{class="code",quantile="0.95",tenant="acme"}'] == 30.0
    assert series['dspark_request_latency_seconds_count{class="chat",tenant="acme"}'] == 1
    assert series['dspark_quota_used_tokens{count="total",tenant="acme",window_s="3600"}'] == 450
    assert series["dspark_cost_per_hour_usd"] == 300.0
    # No output yet in a group -> its cost per token is undefined and left out (not NaN).
    assert 'dspark_cost_per_million_output_tokens_usd{class="chat",tenant="beta"}' not in series


def test_the_collector_reads_the_governor_at_every_scrape():
    from prometheus_client import CollectorRegistry, generate_latest
    from dspark_jax.governance import GovernorCollector
    clock = FakeClock()
    gov = Governor(policy_from_dict(POLICY), clock=clock)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GovernorCollector(gov))
    assert 'dspark_output_tokens_total{class="code",tenant="acme"}' not in check_exposition(
        generate_latest(registry).decode())
    feed(gov, clock)
    series = check_exposition(generate_latest(registry).decode())
    assert series['dspark_output_tokens_total{class="code",tenant="acme"}'] == 200


def test_snapshot_files_are_written_atomically_and_validated(tmp_path):
    clock = FakeClock()
    gov = Governor(policy_from_dict(POLICY), clock=clock)
    feed(gov, clock)
    path = gov.write_snapshot(tmp_path / "sub" / "snap.json")
    assert read_snapshot(path) == json.loads(json.dumps(gov.snapshot()))
    assert [p.name for p in path.parent.iterdir()] == ["snap.json"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match="snapshot file not found"):
        read_snapshot(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        read_snapshot(tmp_path / "bad.json")
    write_snapshot(tmp_path / "other.json", {"schema": "something-else"})
    with pytest.raises(ValueError, match="not a governance snapshot"):
        read_snapshot(tmp_path / "other.json")
    with pytest.raises(ValueError):  # NaN is refused rather than written as invalid JSON
        write_snapshot(tmp_path / "nan.json", {"x": float("nan")})
    assert not (tmp_path / "nan.json").exists() and not list(tmp_path.glob(".nan.json.*"))

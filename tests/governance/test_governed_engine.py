"""The governed engine: policy settings reach the engine (speculation off never drafts, max_draft caps every
round), rejections queue nothing while admitted requests give exact greedy output, governor metrics equal the
engine's per-request stats, automatic rollback switches a class to plain decoding, and the A/B test writes its
table, JSON and plots. One module-scoped engine (tiny target, random drafter) serves every test."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from dspark_jax.drafters.factory import random_drafter
from dspark_jax.governance import GovernedRequest, Governor, RequestRejected, policy_from_dict
from dspark_jax.governance.ab import baseline_policy, check_workload, run_ab
from dspark_jax.governance.ab_report import recommend, write_ab
from dspark_jax.governance.serving import GovernedEngine, GovernorRelay, engine_request
from dspark_jax.serving.cost_table import CostTable
from dspark_jax.serving.engine import Engine, EngineConfig
from dspark_jax.serving.requests import RequestStats
from dspark_jax.testing.tiny_target import make_tiny_target, plain_greedy

POLICY = {
    "gamma": 3, "cost_per_hour_usd": 36.0,
    "classes": {
        "plain": {"speculate": False, "max_draft": 0, "scheduler_mode": "off"},
        "capped": {"max_draft": 2, "scheduler_mode": "fixed", "confidence_floor": 0.9},
        "wide": {"max_draft": 3, "scheduler_mode": "fixed"},
        "adaptive": {"max_draft": 3, "scheduler_mode": "hardware_aware"},
        "hopeless": {"max_draft": 3, "scheduler_mode": "fixed",
                     "rollback": {"metric": "acceptance", "threshold": 0.99, "window": 5, "probation_s": 3600}},
        "small": {"max_prompt_tokens": 6, "sampling": {"max_new_tokens": 12, "default_max_new_tokens": 12}},
    },
    "tenants": {"acme": {"classes": "*"},
                "tight": {"classes": "*", "quotas": [{"tokens": 40, "window_s": 3600, "count": "total"}]}},
}
PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(3, 97, size=3 + (5 * i) % 11)] for i in range(6)]


class RecordingGovernor(Governor):
    """A real Governor that also keeps every round it is told about."""

    def __init__(self, policy):
        super().__init__(policy)
        self.rounds: list[tuple[str, int, int, int, bool]] = []

    def record_round(self, request_id, *, verified_draft, accepted, committed, drafted=True, now=None):
        self.rounds.append((request_id, verified_draft, accepted, committed, drafted))
        super().record_round(request_id, verified_draft=verified_draft, accepted=accepted, committed=committed,
                             drafted=drafted, now=now)


@pytest.fixture(scope="module")
def target():
    return make_tiny_target()


@pytest.fixture(scope="module")
def engine(target):
    drafter = random_drafter(target, "dspark", gamma=3, num_layers=1)
    return Engine(target, drafter, EngineConfig(slots=4, max_len=64, policy="scheduler", threshold=0.0),
                  cost_table=CostTable((4, 8, 16), (100.0, 70.0, 40.0)))


@pytest.fixture(scope="module")
def policy():
    return policy_from_dict(POLICY, "test-policy")


@pytest.fixture(scope="module")
def greedy(target):
    cache = {}
    return lambda prompt, n: cache.setdefault((tuple(prompt), n), plain_greedy(target, prompt, n))


def test_class_settings_reach_the_engine_round_by_round(engine, policy, greedy):
    gov = RecordingGovernor(policy)
    governed = GovernedEngine(engine, gov)
    ids = {cls: [governed.submit("acme", prompt_ids=p, workload_class=cls, max_new_tokens=12) for p in PROMPTS[:3]]
           for cls in ("plain", "capped", "wide")}
    governed.run_until_idle()
    verified = {cls: [v for rid in rids for r, v, *_ in gov.rounds if r == governed.admission(rid).request_id]
                for cls, rids in ids.items()}
    assert verified["plain"] and set(verified["plain"]) == {0}       # speculation off: never a draft
    assert max(verified["capped"]) == 2                               # max_draft 2, confidence ignored (fixed)
    assert max(verified["wide"]) == 3                                 # the drafter could verify 3
    for cls, rids in ids.items():
        for rid, p in zip(rids, PROMPTS):
            assert governed.tokens(rid) == greedy(p, 12)              # speculation never changes greedy output
    a = governed.admission(ids["capped"][0])
    assert (a.speculate, a.max_draft, a.scheduler_mode) == (True, 2, "fixed")
    assert engine_request(a, [3]).confidence_floor == 0.0 and engine_request(a, [3]).draft_mode == "fixed"
    assert engine_request(governed.admission(ids["plain"][0]), [3]).draft_mode == "off"


def test_rejections_queue_nothing_and_admitted_requests_complete_exactly(engine, policy, greedy):
    gov = Governor(policy)
    governed = GovernedEngine(engine, gov)
    ok = [governed.submit("tight", prompt_ids=p, workload_class="wide", max_new_tokens=12) for p in PROMPTS[:2]]
    with pytest.raises(RequestRejected, match="quota of 40 tokens") as e:  # 3 + 12 and 8 + 12 reserved already
        governed.submit("tight", prompt_ids=PROMPTS[2], workload_class="wide", max_new_tokens=12)
    assert e.value.code == "quota_exceeded"
    with pytest.raises(RequestRejected, match="exceeds the context budget of 6 tokens") as e:
        governed.submit("acme", prompt_ids=PROMPTS[1], workload_class="small", max_new_tokens=8)
    assert e.value.code == "context_budget"
    with pytest.raises(RequestRejected, match="exceeds the cap of 12") as e:
        governed.submit("acme", prompt_ids=PROMPTS[0], workload_class="small", max_new_tokens=13)
    assert e.value.code == "sampling_limit"
    assert gov.in_flight == 2
    governed.run_until_idle()
    assert [governed.tokens(r) for r in ok] == [greedy(p, 12) for p in PROMPTS[:2]]
    snap = gov.snapshot()
    assert snap["totals"]["rejected"] == 3 and snap["totals"]["ok_requests"] == 2 and gov.in_flight == 0
    assert snap["quotas"]["tight"][0]["reserved"] == 0  # reservations released at finish


def test_governor_metrics_equal_engine_stats_and_failures_release_quota(engine, policy):
    gov = Governor(policy)
    governed = GovernedEngine(engine, gov)
    rids = [governed.submit("tight" if i == 0 else "acme", prompt_ids=p, workload_class=cls, max_new_tokens=10)
            for i, (p, cls) in enumerate(zip(PROMPTS, ["adaptive", "wide", "plain", "adaptive", "capped", "wide"]))]
    engine.step()
    governed.cancel(rids[0])  # running: a failed request; its quota must be released
    governed.run_until_idle()
    stats = {r: governed.stats(r) for r in rids}
    assert stats[rids[0]].finish_reason == "cancelled"
    snap = gov.snapshot()
    by_class: dict[str, list[RequestStats]] = {}
    for r in rids:
        by_class.setdefault(governed.admission(r).workload_class, []).append(stats[r])
    for cls, sts in by_class.items():
        g = snap["by_class"][cls]
        assert g["rounds"] == sum(s.rounds for s in sts)
        assert g["verified_draft_tokens"] == sum(s.verified_draft for s in sts)
        assert g["accepted_draft_tokens"] == sum(s.accepted_draft for s in sts)
        assert g["fallback_rounds"] == sum(s.no_draft_rounds for s in sts)
        assert g["output_tokens"] == sum(s.output_tokens for s in sts)
        assert g["committed_tokens"] == sum(s.output_tokens - 1 for s in sts)  # the prefill token is no round
        assert g["prompt_tokens"] == sum(s.prompt_tokens for s in sts)
    assert snap["by_class"]["adaptive"]["failed_requests"] == 1 and snap["totals"]["ok_requests"] == 5
    assert snap["quotas"]["tight"][0]["reserved"] == 0 and gov.in_flight == 0
    assert snap["totals"]["busy_seconds"] > 0 and snap["totals"]["cost_usd"] > 0


def test_rollback_switches_a_hopeless_class_to_plain_decoding(engine, policy, greedy):
    gov = RecordingGovernor(policy)
    governed = GovernedEngine(engine, gov)
    first = [governed.submit("acme", prompt_ids=p, workload_class="hopeless", max_new_tokens=12) for p in PROMPTS[:3]]
    governed.run_until_idle()
    assert gov.class_state("hopeless") == "rolled_back"
    assert "below threshold 0.99" in gov.switches[0].reason
    gov.rounds.clear()
    later = [governed.submit("acme", prompt_ids=p, workload_class="hopeless", max_new_tokens=12) for p in PROMPTS[3:]]
    governed.run_until_idle()
    assert all(not governed.admission(r).speculate for r in later)
    assert gov.rounds and {v for _, v, *_ in gov.rounds} == {0}       # no draft verified after the rollback
    assert [governed.tokens(r) for r in first + later] == [greedy(p, 12) for p in PROMPTS]


def test_relay_replays_events_reported_before_registration(policy):
    class FakeEngine:
        observer = None

    gov = Governor(policy)
    relay = GovernorRelay.attach(FakeEngine())
    a = gov.admit(GovernedRequest(tenant="acme", workload_class="wide", prompt_tokens=3))
    with relay.submitting():
        relay.on_start(7)                                            # the engine loop was faster than submit
        relay.on_round(7, 3, 1, 2, True)
        relay.register(7, gov, a.request_id)
    relay.on_round(8, 3, 3, 4, True)                                 # an ungoverned request: ignored
    relay.on_finish(7, RequestStats(prompt_tokens=3, output_tokens=3, rounds=1, submitted_at=1.0,
                                    first_token_at=1.5, finished_at=2.0, finish_reason="length"))
    g = gov.snapshot()["by_class"]["wide"]
    assert (g["rounds"], g["verified_draft_tokens"], g["accepted_draft_tokens"], g["ok_requests"]) == (1, 3, 1, 1)
    assert g["latency_p50_s"] == 1.0 and gov.in_flight == 0


def test_ab_writes_table_json_and_plots(engine, policy, tmp_path):
    prompts = {"plain": PROMPTS[:2], "wide": PROMPTS[2:4], "adaptive": PROMPTS[4:]}
    lines = []
    result = run_ab(engine, policy, prompts, tenant="acme", max_new_tokens=8, concurrency=2, progress=lines.append)
    assert len(lines) == 2 * 3 and result["blocks"] == 3               # 6 requests in blocks of 2, both arms
    base = [r for r in result["requests"] if r["arm"] == "baseline"]
    acc = [r for r in result["requests"] if r["arm"] == "accelerated"]
    assert len(base) == len(acc) == 6 and all(r["verified_draft"] == 0 and not r["speculate"] for r in base)
    assert sum(r["verified_draft"] for r in acc if r["workload_class"] == "wide") > 0
    paths = write_ab(result, policy, tmp_path, header="tiny A/B")
    assert sorted(p.name for p in paths) == ["ab.json", "ab.md", "ab_cost.png", "ab_latency.png",
                                             "ab_tokens_per_cycle.png"]
    assert all(p.stat().st_size > 0 for p in paths) and not list(tmp_path.glob(".*tmp"))
    md = (tmp_path / "ab.md").read_text()
    for cls in [*prompts, "all classes"]:
        assert f"| {cls} | baseline |" in md and f"| {cls} | accelerated |" in md
    data = json.loads((tmp_path / "ab.json").read_text())
    tables = data["tables"]
    assert tables["plain"]["recommendation"]["action"] == "baseline"
    assert tables["wide"]["baseline"]["tokens_per_cycle"] == 1.0 and tables["wide"]["baseline"]["fallback_rate"] == 1
    assert tables["wide"]["greedy_identical"] == {"pairs": 2, "identical": 2}
    assert tables["all classes"]["greedy_identical"] == {"pairs": 6, "identical": 6}
    assert tables["all classes"]["paired"]["pairs"] == 6 and tables["all classes"]["baseline"]["requests"] == 6
    assert tables["wide"]["recommendation"]["action"] in ("keep", "narrow", "roll back")


def test_recommendation_follows_the_numbers(policy):
    def m(p50, cost, acceptance, per_cycle=0.5):
        return dict(latency_p50_s=p50, latency_p95_s=p50, cost_per_output_token_usd=cost, acceptance_rate=acceptance,
                    accepted_per_cycle=per_cycle)
    base = m(2.0, 1.0, None)
    p = dataclasses.replace(policy, classes=tuple(
        dataclasses.replace(c, rollback=dataclasses.replace(policy.workload_class("hopeless").rollback, threshold=0.4))
        if c.name == "wide" else c for c in policy.classes))
    assert recommend(p, "wide", base, m(1.0, 0.5, 0.6), [])["action"] == "keep"
    assert recommend(p, "wide", base, m(1.0, 0.5, 0.1), [])["action"] == "narrow"      # faster, unhealthy
    r = recommend(p, "wide", base, m(2.5, 1.3, 0.6), [])                               # healthy, slower
    assert r["action"] == "narrow" and r["suggested_max_draft"] == 2 and "does not pay" in r["reason"]
    assert recommend(p, "wide", base, m(2.5, 1.3, 0.1), [])["action"] == "roll back"
    switched = [dict(workload_class="wide", to_state="rolled_back", reason="acceptance fell")]
    assert recommend(p, "wide", base, m(1.0, 0.5, 0.6), switched)["action"] == "roll back"
    assert recommend(p, "plain", base, base, [])["action"] == "baseline"


def test_workload_checks_and_baseline_policy(policy):
    with pytest.raises(ValueError, match="unknown tenant 'nobody'"):
        check_workload(policy, "nobody", ["wide"], 8)
    with pytest.raises(ValueError, match="unknown workload class 'poetry'"):
        check_workload(policy, "acme", ["poetry"], 8)
    with pytest.raises(ValueError, match="exceeds the cap of 12"):
        check_workload(policy, "acme", ["small"], 13)
    base = baseline_policy(policy)
    assert all(not c.speculate and c.max_draft == 0 and c.rollback is None for c in base.classes)
    assert base.tenants == policy.tenants
    from dspark_jax.cli.ab import load_class_prompts
    with pytest.raises(ValueError, match="no evaluation prompt set for class 'creative'"):
        load_class_prompts(["code", "creative"], 2)
    assert [len(v) for v in load_class_prompts(["code", "math", "chat"], 2).values()] == [2, 2, 2]

"""Automatic rollback: a low-acceptance (or slow) class switches to plain decoding, is probed after probation,
and is restored with healthy probes or stays rolled back with unhealthy ones."""
from __future__ import annotations

import logging

import pytest

from dspark_jax.governance import GovernedRequest, Governor, policy_from_dict
from dspark_jax.testing.fake_clock import FakeClock

POLICY = {
    "gamma": 7, "cost_per_hour_usd": 300.0,
    "classes": {
        "chat": {"max_draft": 4, "rollback": {"metric": "acceptance", "threshold": 0.5, "window": 10,
                                              "probation_s": 60, "probe_fraction": 0.25, "probe_window": 8}},
        "fast": {"rollback": {"metric": "p95_latency_s", "threshold": 2.0, "window": 5, "probation_s": 30,
                              "probe_fraction": 1.0, "probe_window": 3}},
        "plain": {"speculate": False, "max_draft": 0, "scheduler_mode": "off"},
        "free": {},  # no rollback rule
    },
    "tenants": {"acme": {"classes": "*"}},
}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def gov(clock, store_section):
    governor = Governor(policy_from_dict(dict(POLICY, **store_section)), clock=clock)
    yield governor
    governor.close()


def admit(gov, cls: str = "chat"):
    return gov.admit(GovernedRequest(tenant="acme", workload_class=cls, prompt_tokens=10))


def rounds(gov, request_id: str, n: int, verified: int, accepted: int) -> None:
    for _ in range(n):
        gov.record_round(request_id, verified_draft=verified, accepted=accepted, committed=accepted + 1)


def roll_back_chat(gov, clock) -> str:
    """Feeds 10 rounds at acceptance 0.25; returns the id of the (still running) request."""
    old = admit(gov)
    rounds(gov, old.request_id, 9, verified=4, accepted=1)
    assert gov.class_state("chat") == "speculative"  # window not full yet
    clock.t = 5.0
    rounds(gov, old.request_id, 1, verified=4, accepted=1)
    assert gov.class_state("chat") == "rolled_back"
    return old.request_id


def test_low_acceptance_rolls_back_probes_and_recovers(gov, clock, caplog):
    with caplog.at_level(logging.INFO, logger="dspark_jax.governance"):
        old = roll_back_chat(gov, clock)
    (event,) = gov.switches
    assert (event.time, event.workload_class, event.from_state, event.to_state, event.metric, event.value,
            event.threshold) == (5.0, "chat", "speculative", "rolled_back", "acceptance", 0.25, 0.5)
    assert "rolling acceptance 0.250 over the last 10 drafted rounds below threshold 0.5" in event.reason
    assert any(r.levelno == logging.WARNING and "'chat': speculative -> rolled_back" in r.getMessage()
               for r in caplog.records)

    # Rolled back: plain decoding for everyone; other classes unaffected.
    a = admit(gov)
    assert (a.speculate, a.max_draft, a.scheduler_mode, a.probe) == (False, 0, "off", False)
    assert admit(gov, "free").speculate
    rounds(gov, old, 50, verified=4, accepted=4)  # the old request's rounds no longer count
    clock.t = 64.9
    assert not admit(gov).speculate and gov.class_state("chat") == "rolled_back"

    # Probation over: one request in four speculates as a probe, starting with the first.
    clock.t = 65.0
    admitted = [admit(gov) for _ in range(8)]
    assert [a.probe for a in admitted] == [True, False, False, False, True, False, False, False]
    assert [a.speculate for a in admitted] == [a.probe for a in admitted]
    assert admitted[0].max_draft == 4 and admitted[0].scheduler_mode == "hardware_aware"
    assert gov.class_state("chat") == "probing" and gov.switches[-1].time == 65.0
    assert gov.switches[-1].value is None

    # Healthy probes (acceptance 0.75 over 8 probe rounds) restore the class.
    rounds(gov, old, 20, verified=4, accepted=0)  # pre-rollback request: ignored
    for a in admitted[1:4]:
        gov.record_round(a.request_id, verified_draft=0, accepted=0, committed=1, drafted=False)
    clock.t = 70.0
    rounds(gov, admitted[0].request_id, 4, verified=4, accepted=3)
    rounds(gov, admitted[4].request_id, 3, verified=4, accepted=3)
    assert gov.class_state("chat") == "probing"
    rounds(gov, admitted[4].request_id, 1, verified=4, accepted=3)
    assert gov.class_state("chat") == "speculative"
    restore = gov.switches[-1]
    assert (restore.from_state, restore.to_state, restore.value, restore.time) == ("probing", "speculative", 0.75, 70.0)
    assert "speculation restored" in restore.reason
    b = admit(gov)
    assert (b.speculate, b.probe, b.max_draft) == (True, False, 4)
    assert [(e.from_state, e.to_state) for e in gov.switches] == [
        ("speculative", "rolled_back"), ("rolled_back", "probing"), ("probing", "speculative")]


def test_unhealthy_probes_keep_the_class_rolled_back(gov, clock):
    roll_back_chat(gov, clock)
    clock.t = 100.0
    probe = admit(gov)
    assert probe.probe
    rounds(gov, probe.request_id, 8, verified=4, accepted=0)
    assert gov.class_state("chat") == "rolled_back"
    last = gov.switches[-1]
    assert (last.from_state, last.to_state, last.value) == ("probing", "rolled_back", 0.0)
    assert "another probation period" in last.reason
    assert gov.snapshot()["classes"]["chat"]["rollback"]["probation_until"] == 160.0
    clock.t = 159.0
    assert not admit(gov).speculate
    clock.t = 160.0
    assert admit(gov).probe and gov.class_state("chat") == "probing"


def test_p95_latency_rule(gov, clock):
    for latency in (1.0, 1.0, 1.0, 1.0):
        a = admit(gov, "fast")
        gov.record_finish(a.request_id, prompt_tokens=10, output_tokens=10, latency_s=latency)
    failed = admit(gov, "fast")
    gov.record_finish(failed.request_id, prompt_tokens=10, output_tokens=0, latency_s=50.0, ok=False)  # not counted
    assert gov.class_state("fast") == "speculative"
    clock.t = 3.0
    a = admit(gov, "fast")
    gov.record_finish(a.request_id, prompt_tokens=10, output_tokens=10, latency_s=5.0)  # p95 = 1 + 0.8 * 4 = 4.2
    assert gov.class_state("fast") == "rolled_back"
    assert gov.switches[-1].value == pytest.approx(4.2) and "rolling p95 latency 4.200 s" in gov.switches[-1].reason
    clock.t = 33.0
    probes = [admit(gov, "fast") for _ in range(3)]
    assert all(p.probe and p.speculate for p in probes)  # probe_fraction 1.0
    for p in probes:
        gov.record_finish(p.request_id, prompt_tokens=10, output_tokens=10, latency_s=1.5)
    assert gov.class_state("fast") == "speculative"


def test_states_visible_in_snapshot_and_prometheus(gov, clock):
    roll_back_chat(gov, clock)
    snap = gov.snapshot()
    assert snap["classes"]["chat"]["state"] == "rolled_back"
    assert snap["classes"]["plain"]["state"] == "disabled" and snap["classes"]["free"]["rollback"] is None
    assert snap["classes"]["fast"]["state"] == "speculative"
    assert snap["switches"][0]["to_state"] == "rolled_back" and snap["switches"][0]["value"] == 0.25
    text = gov.prometheus_text()
    assert 'dspark_speculation_state{class="chat",state="rolled_back"} 1.0' in text
    assert 'dspark_speculation_state{class="chat",state="speculative"} 0.0' in text
    assert 'dspark_speculation_switches_total{class="chat",from="speculative",to="rolled_back"} 1.0' in text
    assert gov.class_state("plain") == "disabled" and gov.class_state("free") == "speculative"
    with pytest.raises(KeyError):
        gov.class_state("nope")

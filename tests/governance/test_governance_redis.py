"""The shared governance store in a real Redis: several Governors (one per replica) agree on quotas and rollback
states, dead replicas' reservations expire, and a Redis outage is handled as the policy says, then recovered."""
from __future__ import annotations

import threading
import time

import pytest

from dspark_jax.governance import GovernedRequest, Governor, PolicyError, RequestRejected, policy_from_dict
from dspark_jax.governance.policy_validation import with_store_url
from dspark_jax.governance.prometheus import render_prometheus
from dspark_jax.governance.redis_store import open_redis_store
from dspark_jax.governance.store import redact
from dspark_jax.testing.fake_clock import FakeClock

POLICY = {
    "gamma": 4, "cost_per_hour_usd": 100.0,
    "classes": {"chat": {"sampling": {"default_max_new_tokens": 50},
                         "rollback": {"threshold": 0.5, "window": 4, "probation_s": 100, "probe_fraction": 1.0,
                                      "probe_window": 2}}},
    "tenants": {"acme": {"classes": ["chat"], "quotas": [{"tokens": 1000, "window_s": 3600, "count": "output"}]},
                "free": {"classes": ["chat"]}},
}


def replicas(url: str, prefix: str, n: int = 2, clock=None, heartbeat: bool = True, **store):
    """n Governors sharing the Redis at `url` under `prefix`, as n server replicas would."""
    policy = policy_from_dict(dict(POLICY, store=dict(dict(url=url, key_prefix=prefix, sync_s=0), **store)))
    clock = clock or time.time
    return [Governor(policy, clock, store=open_redis_store(policy.store, {"acme": policy.tenant("acme").quotas},
                                                           clock, heartbeat=heartbeat)) for _ in range(n)]


def admit(gov, tenant="acme", max_new_tokens=50):
    return gov.admit(GovernedRequest(tenant=tenant, prompt_tokens=7, max_new_tokens=max_new_tokens))


def quota(gov) -> dict:
    return gov.snapshot()["quotas"]["acme"][0]


def test_a_burst_over_two_replicas_never_admits_more_than_the_quota(redis_server, store_prefix):
    a, b = replicas(redis_server.url, store_prefix)
    # one admission on each replica first, so both hold part of the shared quota whatever the threads' scheduling
    # (under load one replica's threads could otherwise take every admission of the burst)
    admitted, rejected, barrier = [(gov, admit(gov)) for gov in (a, b)], [], threading.Barrier(8)

    def client(i):
        gov = (a, b)[i % 2]
        barrier.wait()
        for _ in range(10):
            try:
                admitted.append((gov, admit(gov)))
            except RequestRejected as e:
                assert e.code == "quota_exceeded"
                rejected.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(admitted) == 20 and len(rejected) == 62  # 1000 tokens / 50 per request, over both replicas
    assert {gov for gov, _ in admitted} == {a, b}
    assert quota(a)["reserved"] == quota(b)["reserved"] == 1000
    for i, (gov, adm) in enumerate(admitted):
        gov.record_finish(adm.request_id, prompt_tokens=7, output_tokens=i, latency_s=0.1)
    assert quota(b) == quota(a) and quota(a)["used"] == sum(range(20)) and quota(a)["reserved"] == 0
    for gov in (a, b):
        gov.close()


def test_a_dead_replicas_reservation_comes_back_after_its_lease(redis_server, store_prefix):
    clock = FakeClock(1000.0)
    dead, live = replicas(redis_server.url, store_prefix, clock=clock, heartbeat=False, lease_s=30)
    admit(dead, max_new_tokens=600)   # then the replica dies: no renewal, no settlement
    held = admit(live, max_new_tokens=300)
    with pytest.raises(RequestRejected, match="600 reserved|900 reserved"):
        admit(live, max_new_tokens=200)
    clock.t += 20
    live.store.quotas.renew_leases()  # the live replica's heartbeat
    clock.t += 20  # 40 s after the reservations: the dead one's lease ran out, the renewed one holds
    assert quota(live)["reserved"] == 300
    admit(live, max_new_tokens=700)
    live.record_finish(held.request_id, prompt_tokens=7, output_tokens=300, latency_s=1.0)
    assert quota(live)["used"] == 300 and quota(live)["overshoot_total"] == 0


def test_a_rollback_on_one_replica_is_seen_by_the_other_and_recorded_once(redis_server, store_prefix):
    clock = FakeClock(1000.0)
    a, b = replicas(redis_server.url, store_prefix, clock=clock, heartbeat=False)
    req_a, req_b = admit(a, "free"), admit(b, "free")
    for gov, req in ((a, req_a), (b, req_b)):  # both replicas see acceptance 0.25 ...
        for _ in range(3):
            gov.record_round(req.request_id, verified_draft=4, accepted=1, committed=2)
    a.record_round(req_a.request_id, verified_draft=4, accepted=1, committed=2)  # ... a's window fills first
    assert a.class_state("chat") == b.class_state("chat") == "rolled_back"
    b.record_round(req_b.request_id, verified_draft=4, accepted=1, committed=2)  # an old epoch's round: ignored
    assert len(a.switches) == len(b.switches) == 1 and b.switches[0].to_state == "rolled_back"
    assert not admit(b, "free").speculate  # b admits plainly now
    clock.t += 100  # probation over: the first replica to look starts probing, once
    assert b.class_state("chat") == a.class_state("chat") == "probing"
    probe = admit(a, "free")
    assert probe.speculate and probe.probe
    for _ in range(2):
        a.record_round(probe.request_id, verified_draft=4, accepted=4, committed=5)
    assert b.class_state("chat") == "speculative"
    assert [e.to_state for e in b.switches] == ["rolled_back", "probing", "speculative"]
    assert 'dspark_speculation_switches_total{class="chat",from="speculative",to="rolled_back"} 1.0' in \
        b.prometheus_text()


@pytest.mark.parametrize("on_error", ["reject", "allow"])
def test_redis_outage_then_recovery(on_error, store_prefix):
    from dspark_jax.testing.redis_server import RedisServer
    server = RedisServer().start()
    try:
        (gov,) = replicas(server.url, store_prefix, n=1, on_error=on_error)
        gov.store.health.retry_s = 0.2
        first = admit(gov)
        server.stop()
        if on_error == "reject":
            with pytest.raises(RequestRejected) as info:
                admit(gov)
            assert info.value.code == "store_unavailable" and info.value.retry_after_s == 0.2
            assert admit(gov, "free").speculate  # tenants without quotas never need the store
        else:
            during = admit(gov)
            gov.record_finish(during.request_id, prompt_tokens=7, output_tokens=40, latency_s=0.5)
        gov.record_finish(first.request_id, prompt_tokens=7, output_tokens=30, latency_s=0.5)  # settlement waits
        snap = gov.snapshot()
        assert snap["store"]["up"] is False and snap["store"]["errors"]["reserve"] >= 1
        assert snap["store"]["pending_settlements"] == (1 if on_error == "reject" else 2)
        text = render_prometheus(snap)
        assert 'dspark_governance_store_up{kind="redis"} 0.0' in text
        assert 'dspark_governance_store_errors_total{operation="settle"}' in text
        server.start()  # same port, empty: Redis came back after losing its data
        time.sleep(0.3)
        admit(gov)  # reconnected by itself
        snap = gov.snapshot()
        assert snap["store"]["up"] is True and snap["store"]["pending_settlements"] == 0
        row = snap["quotas"]["acme"][0]
        assert row["reserved"] == 50 and row["used"] == (30 if on_error == "reject" else 70)
        assert row["overshoot_total"] == (30 if on_error == "reject" else 70)  # reservations died with Redis
        gov.close()
    finally:
        server.stop()


def test_store_settings_are_validated_and_redacted(redis_server):
    with pytest.raises(PolicyError, match=r"store.url: must be 'memory' or a Redis URL"):
        policy_from_dict(dict(POLICY, store={"url": "http://x"}))
    with pytest.raises(PolicyError, match=r"store.on_error: must be one of reject, allow"):
        policy_from_dict(dict(POLICY, store={"on_error": "ignore"}))
    with pytest.raises(PolicyError, match=r"store.lease: unknown field \(did you mean 'lease_s'\?\)"):
        policy_from_dict(dict(POLICY, store={"lease": 3}))
    with pytest.raises(PolicyError, match=r"--quota_store: url: must be"):
        with_store_url(policy_from_dict(POLICY), "redis:/typo")
    assert redact("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("redis://:secret@host/0") == "redis://:***@host/0" and redact("memory") == "memory"
    policy = with_store_url(policy_from_dict(POLICY), redis_server.url)
    assert policy.store.url == redis_server.url and policy.store.on_error == "reject"

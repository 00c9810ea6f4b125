"""Tenant token quotas: reservation at admission, reconciliation at finish, fixed windows, concurrency — each
test against the in-process ledger and against the Redis one (a real redis-server, see conftest.py)."""
from __future__ import annotations

import random
import threading

import pytest

from dspark_jax.governance import GovernedRequest, Governor, RequestRejected, policy_from_dict
from dspark_jax.governance.policy import QuotaRule
from dspark_jax.governance.quotas import QuotaExceeded, QuotaLedger
from dspark_jax.governance.redis_store import RedisCalls, RedisQuotaLedger, connect
from dspark_jax.governance.store import StoreHealth
from dspark_jax.testing.fake_clock import FakeClock


@pytest.fixture
def make_ledger(store_kind, request, store_prefix):
    """quotas -> a ledger of the kind under test (Redis leases long enough never to expire here)."""
    def make(quotas):
        if store_kind == "memory":
            return QuotaLedger(quotas)
        server = request.getfixturevalue("redis_server")
        return RedisQuotaLedger(RedisCalls(connect(server.url), StoreHealth()), quotas, store_prefix, 1e9,
                                clock=lambda: 0.0)
    return make


@pytest.fixture
def ledger(make_ledger):
    return lambda *rules: make_ledger({"acme": rules})


def usage(led, now: float, i: int = 0) -> tuple[int, int]:
    row = led.snapshot(now)["acme"][i]
    return row["used"], row["reserved"]


def test_reservation_blocks_concurrent_requests_and_reconciliation_frees_the_rest(ledger):
    led = ledger(QuotaRule(tokens=1000, window_s=60))
    led.reserve("r1", "acme", prompt_tokens=100, max_new_tokens=400, now=1)
    led.reserve("r2", "acme", prompt_tokens=100, max_new_tokens=400, now=2)
    assert usage(led, 2) == (0, 1000)
    with pytest.raises(QuotaExceeded, match=r"tenant 'acme' quota of 1000 tokens \(prompt \+ output\) per 60 s would "
                                            r"be exceeded: 0 used and 1000 reserved .* needs up to 1; the window "
                                            r"resets in 57 s"):
        led.reserve("r3", "acme", prompt_tokens=0, max_new_tokens=1, now=3)
    led.reconcile("r1", prompt_tokens=100, output_tokens=150, now=4)  # 250 charged, 250 of the 500 freed
    assert usage(led, 4) == (250, 500)
    led.reserve("r3", "acme", prompt_tokens=50, max_new_tokens=200, now=5)  # exactly fills the quota
    assert usage(led, 5) == (250, 750)
    with pytest.raises(QuotaExceeded):
        led.reserve("r4", "acme", prompt_tokens=0, max_new_tokens=1, now=5)
    with pytest.raises(ValueError, match="already holds"):
        led.reserve("r3", "acme", prompt_tokens=0, max_new_tokens=1, now=5)
    assert led.snapshot(5)["acme"][0]["remaining"] == 0


def test_window_roll_over_keeps_in_flight_reservations(ledger):
    led = ledger(QuotaRule(tokens=1000, window_s=60))
    led.reserve("a", "acme", 100, 300, now=10)
    led.reconcile("a", 100, 300, now=20)
    led.reserve("b", "acme", 100, 500, now=50)  # in flight across the boundary
    assert usage(led, 59.9) == (400, 600)
    assert usage(led, 60.0) == (0, 600)  # new window: charges reset, the reservation stays
    with pytest.raises(QuotaExceeded):
        led.reserve("c", "acme", 0, 401, now=61)
    led.reconcile("b", 100, 200, now=70)  # charged to the window current at finish
    assert usage(led, 70) == (300, 0)
    assert led.snapshot(70)["acme"][0]["window_start"] == 60.0
    led.reserve("c", "acme", 0, 700, now=71)
    assert usage(led, 130) == (0, 700)


def test_output_only_counting_and_several_quotas_are_atomic(ledger):
    led = ledger(QuotaRule(tokens=500, window_s=60, count="output"), QuotaRule(tokens=1000, window_s=3600))
    led.reserve("a", "acme", prompt_tokens=800, max_new_tokens=100, now=0)
    assert usage(led, 0, 0) == (0, 100) and usage(led, 0, 1) == (0, 900)
    with pytest.raises(QuotaExceeded, match="per 3600 s"):  # fits the output quota, not the hourly total one
        led.reserve("b", "acme", prompt_tokens=50, max_new_tokens=60, now=1)
    assert usage(led, 1, 0) == (0, 100)  # nothing of "b" reserved
    led.reconcile("a", prompt_tokens=800, output_tokens=40, now=2)
    assert usage(led, 2, 0) == (40, 0) and usage(led, 2, 1) == (840, 0)
    assert led.snapshot(2)["acme"][0]["count"] == "output"


def test_tenants_without_quotas_are_unlimited_and_overshoot_is_reported(make_ledger):
    led = make_ledger({"acme": (QuotaRule(tokens=100, window_s=10),)})
    led.reserve("x", "free", 10**9, 10**9, now=0)
    led.reconcile("x", 10**9, 10**9, now=1)
    led.reserve("y", "acme", 10, 10, now=0)
    led.reconcile("y", 10, 30, now=1)  # produced more than it reserved (an engine bug): charged and reported
    row = led.snapshot(1)["acme"][0]
    assert row["used"] == 40 and row["overshoot_total"] == 20


def test_random_interleavings_never_overcharge_a_window(ledger):
    rng = random.Random(0)
    led = ledger(QuotaRule(tokens=5000, window_s=100))
    in_flight, charged = {}, {}
    t = 0.0
    for i in range(3000):
        t += rng.uniform(0, 2)
        if in_flight and rng.random() < 0.5:
            rid = rng.choice(list(in_flight))
            prompt, max_new = in_flight.pop(rid)
            out = rng.randint(0, max_new)
            led.reconcile(rid, prompt, out, now=t)
            charged[t // 100] = charged.get(t // 100, 0) + prompt + out
        else:
            prompt, max_new = rng.randint(0, 300), rng.randint(1, 700)
            try:
                led.reserve(f"r{i}", "acme", prompt, max_new, now=t)
                in_flight[f"r{i}"] = (prompt, max_new)
            except QuotaExceeded:
                pass
        used, reserved = usage(led, t)
        assert used + reserved <= 5000
    assert max(charged.values()) <= 5000 and len(charged) > 10


POLICY = {
    "gamma": 4, "cost_per_hour_usd": 300.0,
    "classes": {"chat": {"sampling": {"default_max_new_tokens": 100}}},
    "tenants": {"acme": {"classes": ["chat"], "quotas": [{"tokens": 1000, "window_s": 3600}]}},
}


def test_governor_reserves_at_admission_and_reconciles_at_finish(store_section):
    clock = FakeClock(0.0)
    gov = Governor(policy_from_dict(dict(POLICY, **store_section)), clock=clock)
    ids = [gov.admit(GovernedRequest(tenant="acme", prompt_tokens=150)).request_id for _ in range(4)]  # 4 x 250
    with pytest.raises(RequestRejected) as info:
        gov.admit(GovernedRequest(tenant="acme", prompt_tokens=1, max_new_tokens=1))
    assert info.value.code == "quota_exceeded" and "1000 reserved" in info.value.reason
    clock.t = 10.0
    for rid in ids[:2]:
        gov.record_finish(rid, prompt_tokens=150, output_tokens=50, latency_s=1.0)  # 200 charged each
    assert gov.snapshot()["quotas"]["acme"][0] == dict(
        tokens=1000, window_s=3600.0, count="total", window_start=0.0, used=400, reserved=500, remaining=100,
        overshoot_total=0)
    gov.admit(GovernedRequest(tenant="acme", prompt_tokens=0, max_new_tokens=100))  # fits exactly
    with pytest.raises(RequestRejected):
        gov.admit(GovernedRequest(tenant="acme", prompt_tokens=0, max_new_tokens=1))
    clock.t = 3600.0  # next window: only the 3 in-flight reservations (600 tokens) count
    gov.admit(GovernedRequest(tenant="acme", prompt_tokens=0, max_new_tokens=100, request_id="late"))
    assert gov.snapshot()["quotas"]["acme"][0]["reserved"] == 700
    assert gov.snapshot()["by_tenant"]["acme"]["rejections"] == {"quota_exceeded": 2}


def test_concurrent_admissions_from_threads_never_overshoot(store_section):
    gov = Governor(policy_from_dict(dict(POLICY, **store_section)), clock=FakeClock(5.0))
    admitted, barrier = [], threading.Barrier(8)

    def worker():
        barrier.wait()
        for _ in range(20):
            try:
                admitted.append(gov.admit(GovernedRequest(tenant="acme", prompt_tokens=30, max_new_tokens=70)))
            except RequestRejected as e:
                assert e.code == "quota_exceeded"

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(admitted) == 10 and len({a.request_id for a in admitted}) == 10
    assert gov.snapshot()["quotas"]["acme"][0]["reserved"] == 1000

"""Two `dspark serve` replicas (tiny target, separate processes) sharing one real Redis: one quota for a tenant
whatever replica serves it, a rollback seen by both, a killed replica's reservation given back after its lease,
and a Redis outage answered as the policy says (503), then recovered.

The module's replicas and Redis are shared by its tests, which run in file order: the kill test kills replica B,
the outage test (last) stops Redis."""
from __future__ import annotations

import concurrent.futures
from pathlib import Path
import signal
import subprocess
import sys
import time

import httpx
import pytest

from dspark_jax.testing.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
POLICY = """
gamma: 3
cost_per_hour_usd: 10.0
classes:
  chat: {}
  code:
    rollback: {metric: acceptance, threshold: 0.99, window: 3, probation_s: 600}
tenants:
  acme: {classes: [chat], quotas: [{tokens: 120, window_s: 3600, count: output}]}
  beta: {classes: [chat, code]}
  gamma: {classes: [chat], quotas: [{tokens: 300, window_s: 3600, count: output}]}
store: {lease_s: 2, sync_s: 0.1}
"""
KEYS = {"acme": "key-acme", "beta": "key-beta", "gamma": "key-gamma"}
REPLICA = r"""
from dspark_jax.utils.compile_cache import enable_compilation_cache
enable_compilation_cache()  # the suite's cache ($DSPARK_XLA_CACHE): the second replica reads the first's programs
from dspark_jax.drafters.factory import random_drafter
from dspark_jax.governance import Governor
from dspark_jax.governance.serving import GovernedEngine
from dspark_jax.server.app import create_app, serve
from dspark_jax.server.auth import ApiKeys
from dspark_jax.server.backend import Backend
from dspark_jax.serving.cost_table import CostTable
from dspark_jax.serving.engine import Engine, EngineConfig
from dspark_jax.testing.tiny_target import make_tiny_target
target = make_tiny_target()
engine = Engine(target, random_drafter(target, "dspark", gamma=3, num_layers=1),
                EngineConfig(slots=2, max_len=320, policy="fixed"), cost_table=CostTable((2, 8), (10.0, 5.0)))
governor = Governor.from_policy_file({policy!r}, store_url={url!r})  # what `dspark serve --quota_store` does
keys = ApiKeys({keys!r})
serve(create_app(Backend(engine, GovernedEngine(engine, governor)), "tiny", keys), "127.0.0.1", {port},
      log_level="warning", graceful_s=5)
"""


class Replica:
    def __init__(self, tmp, name: str, redis_url: str, policy: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = tmp / f"replica_{name}.py"
        script.write_text(REPLICA.format(policy=policy, url=redis_url, port=self.port,
                                         keys={k: t for t, k in KEYS.items()}))
        self.proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT)

    def wait_ready(self) -> None:
        deadline = time.time() + 180
        while True:
            assert self.proc.poll() is None, f"replica on port {self.port} exited with {self.proc.returncode}"
            assert time.time() < deadline, "replica did not start"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)

    def complete(self, tenant: str, max_tokens: int, prompt: str = "hello", **body) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/completions", timeout=120,
                          headers={"Authorization": f"Bearer {KEYS[tenant]}"}, json=dict(prompt=prompt, max_tokens=max_tokens, temperature=0, **body))

    def snapshot(self) -> dict:
        return httpx.get(f"{self.url}/snapshot.json", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    redis = RedisServer().start()
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    replicas = []
    try:
        for name in "ab":  # one after the other: the second starts from the compilation cache
            replicas.append(Replica(tmp, name, redis.url, str(policy)))
            replicas[-1].wait_ready()
        yield redis, *replicas
    finally:
        for replica in replicas:
            replica.stop()
        redis.stop()


def quota(replica, tenant: str) -> dict:
    return replica.snapshot()["quotas"][tenant][0]


def test_a_burst_spread_over_both_replicas_stays_within_one_quota(cluster):
    _, a, b = cluster
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda i: (a, b)[i % 2].complete("acme", 12, prompt=f"burst {i}"), range(24)))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == 24 and ok and refused
    assert refused[0].json()["error"]["code"] == "quota_exceeded" and int(refused[0].headers["retry-after"]) > 0
    emitted = sum(r.json()["usage"]["completion_tokens"] for r in ok)
    for replica in (a, b):  # one ledger: both replicas report the same usage, settled to the tokens emitted
        row = quota(replica, "acme")
        assert row["used"] == emitted <= 120 and row["reserved"] == 0 and row["overshoot_total"] == 0


def test_a_rollback_triggered_through_one_replica_is_seen_by_the_other(cluster):
    _, a, b = cluster
    for i in range(6):  # the random drafter's acceptance is far below 0.99: a rolls the class back
        assert a.complete("beta", 8, prompt=f"code {i}", workload_class="code").status_code == 200
        if a.snapshot()["classes"]["code"]["state"] == "rolled_back":
            break
    assert a.snapshot()["classes"]["code"]["state"] == "rolled_back"
    time.sleep(0.2)  # sync_s
    snap = b.snapshot()
    assert snap["classes"]["code"]["state"] == "rolled_back"
    assert [(e["from_state"], e["to_state"]) for e in snap["switches"]] == [("speculative", "rolled_back")]
    metrics = httpx.get(f"{b.url}/metrics", timeout=10).text
    assert 'dspark_speculation_state{class="code",state="rolled_back"} 1.0' in metrics
    out = b.complete("beta", 8, prompt="plain now", workload_class="code").json()
    assert out["usage"]["accepted_draft_tokens"] == 0  # b decodes the class plainly


def test_a_killed_replica_gives_its_reservation_back_after_the_lease(cluster):
    _, a, b = cluster
    with httpx.stream("POST", f"{b.url}/v1/completions", timeout=60, headers={"Authorization": "Bearer key-gamma"},
                      json=dict(prompt="long", max_tokens=200, temperature=0, stream=True)) as r:
        next(r.iter_lines())  # admitted: 200 tokens reserved
        b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(timeout=30)
    refused = a.complete("gamma", 200)
    assert refused.status_code == 429 and "200 reserved" in refused.json()["error"]["message"]
    time.sleep(2.5)  # the lease (2 s) runs out: no replica renews it
    assert quota(a, "gamma")["reserved"] == 0
    assert a.complete("gamma", 200).status_code == 200


def test_redis_outage_rejects_then_recovers(cluster):
    redis, a, _ = cluster
    redis.stop()
    r = a.complete("acme", 1)
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable" and "retry-after" in r.headers
    assert a.complete("beta", 4).status_code == 200  # no quota, no store needed
    metrics = httpx.get(f"{a.url}/metrics", timeout=10).text
    assert 'dspark_governance_store_up{kind="redis"} 0.0' in metrics
    assert 'dspark_governance_store_errors_total{operation="reserve"}' in metrics
    redis.start()
    time.sleep(1.2)  # the replica retries the store after 1 s
    assert a.complete("acme", 4).status_code == 200
    assert 'dspark_governance_store_up{kind="redis"} 1.0' in httpx.get(f"{a.url}/metrics", timeout=10).text

"""The engine's draft planner on slot arrays alone (no model, nothing compiled): caps per draft mode, confidence
floors, the synchronous and asynchronous plans, and the plain-fallback / probe state machine."""
from __future__ import annotations

import numpy as np
import pytest

from dspark_jax.serving.cost_table import CostTable
from dspark_jax.serving.planner import Planner
from dspark_jax.serving.requests import Request
from dspark_jax.serving.scheduler import schedule_synchronous

CHEAP = CostTable((4, 8, 16, 32), (100.0, 99.0, 98.0, 97.0), plain_steps_per_s=101.0)  # drafting nearly free
COSTLY = CostTable((4, 8, 16, 32), (50.0, 30.0, 20.0, 10.0), plain_steps_per_s=120.0)  # drafting never pays


def req(mode="default", max_draft=None, floor=0.0):
    return Request(prompt_ids=[2, 3], draft_mode=mode, max_draft=max_draft, confidence_floor=floor)


def planner(policy="scheduler", table=CHEAP, plain=True, threshold=0.5):
    return Planner(slots=4, policy=policy, gamma=3, block=4, threshold=threshold, probe_every=2, cost_table=table,
                   has_plain_step=plain)


def test_caps_follow_each_request_mode():
    p = planner(policy="fixed")
    conf = np.array([[0.9, 0.9, 0.9, 0.9], [0.9] * 4, [0.9, 0.4, 0.9, 0.9], [0.9] * 4])
    requests = [req(), req("off"), req("static_threshold", floor=0.5), None]
    assert p.caps(requests, conf).tolist() == [3, 0, 1, 0]  # gamma, off, cut at the first c < 0.5, idle
    assert p.caps([req("fixed", max_draft=9)], None)[0] == 4  # capped at the block size
    assert planner(policy="plain").caps([req(), req("fixed", max_draft=2)], conf).tolist()[:2] == [0, 0]
    floors = planner(policy="threshold", threshold=0.6).floors([req(floor=0.7), req(floor=0.1),
                                                                 req("static_threshold"), req("fixed", floor=0.2)])
    np.testing.assert_allclose(floors, [0.7, 0.6, 0.6, 0.2])


def test_synchronous_plan_runs_algorithm_1_for_hardware_aware_requests_only():
    p = planner()
    conf = np.array([[0.95, 0.9, 0.8, 0.7], [0.3, 0.2, 0.1, 0.1], [0.9] * 4, [0.0] * 4])
    requests = [req(), req("hardware_aware"), req("fixed", max_draft=2), None]
    p.fresh[:] = True
    caps, budget, kind = p.sync_plan(requests, conf)
    expected = schedule_synchronous(conf[:2], CHEAP, np.array([3, 3]), base_tokens=2)
    assert caps.tolist() == expected.tolist() + [2, 0] and budget == caps.sum() and kind == "draft"


def test_plain_fallback_and_probe_backoff():
    p = planner(table=COSTLY)
    requests = [req(), req(), None, None]
    conf = np.full((4, 4), 0.5)
    p.fresh[:] = True
    _, _, kind = p.sync_plan(requests, conf)
    assert kind == "plain"  # a draft step is not expected to beat the target alone
    p.dispatched("plain")
    assert not p.fresh.any() and p.sync_plan(requests, conf)[2] == "plain"  # stale proposals: stay plain ...
    p.dispatched("plain")
    assert p.sync_plan(requests, conf)[2] == "probe"  # ... until a probe is due (probe_every = 2)
    p.dispatched("probe")
    assert p.fresh.all() and p.sync_plan(requests, conf)[2] == "plain"  # the probe still finds no pay-off:
    assert p.probe_interval == 4  # the interval doubles
    p.cost_table = CHEAP
    p.dispatched("probe")
    assert p.sync_plan(requests, np.full((4, 4), 0.9))[2] == "draft" and p.probe_interval == 2
    # a static request in the batch keeps drafting on
    p2 = planner(table=COSTLY)
    p2.fresh[:] = True
    assert p2.sync_plan([req(), req("fixed", max_draft=2), None, None], conf)[2] == "draft"
    assert planner(table=COSTLY, plain=False).sync_plan(requests, conf)[2] == "draft"  # no draft-free step


def test_asynchronous_plan_uses_the_confidences_it_holds():
    p = planner(policy="scheduler_async")
    requests = [req(), req(), None, None]
    p.fresh[:] = True
    caps, budget, _ = p.async_plan(requests, probe_read=False)
    assert caps.tolist() == [3, 3, 0, 0] and budget == 6  # nothing observed yet: the caps
    old, new = np.full((4, 4), 0.1), np.full((4, 4), 0.95)
    p.observed(old)
    p.observed(new)
    _, budget_old, _ = p.async_plan(requests, probe_read=False)  # two steps old: `old`
    _, budget_new, _ = p.async_plan(requests, probe_read=True)  # a probe just read: its own, `new`
    assert budget_old == schedule_synchronous(old[:2], CHEAP, np.array([3, 3]), early_stop=False).sum()
    assert budget_new == schedule_synchronous(new[:2], CHEAP, np.array([3, 3]), early_stop=False).sum()
    with pytest.raises(ValueError, match="policy"):
        planner(policy="magic")

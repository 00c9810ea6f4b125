"""Governor.admit: class resolution, context budgets, overrides (allowed / forbidden / invalid), sampling limits."""
from __future__ import annotations

import pytest

from dspark_jax.governance import GovernedRequest, Governor, RequestRejected, policy_from_dict
from dspark_jax.testing.fake_clock import FakeClock

POLICY = {
    "gamma": 7,
    "cost_per_hour_usd": 300.0,
    "classes": {
        "code": {"max_draft": 7, "confidence_floor": 0.3, "max_prompt_tokens": 1000,
                 "allow_overrides": ["max_draft", "temperature"],
                 "sampling": {"max_temperature": 0.5, "max_new_tokens": 256, "default_max_new_tokens": 128}},
        "chat": {"max_draft": 4, "confidence_floor": 0.6, "allow_overrides": ["speculate", "top_p", "top_k",
                                                                             "scheduler_mode"],
                 "sampling": {"default_temperature": 0.7, "top_p_range": [0.5, 1.0], "max_top_k": 50,
                              "default_top_k": 40}},
        "regulated": {"speculate": False, "max_draft": 0, "scheduler_mode": "off"},
    },
    "tenants": {"acme": {"classes": ["code", "chat"]}, "bank": {"classes": "*"}},
    "classifier": {"default_class": "chat", "rules": [{"class": "regulated", "patterns": ["lawsuit"]},
                                                      {"class": "code", "patterns": ["```", r"\bdef\b"]}]},
}


@pytest.fixture
def governor():
    return Governor(policy_from_dict(POLICY, "test-policy"), clock=FakeClock(1000.0))


def request(**kw) -> GovernedRequest:
    kw.setdefault("tenant", "acme")
    kw.setdefault("prompt_tokens", 10)
    return GovernedRequest(**kw)


def rejected(governor, **kw) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        governor.admit(request(**kw))
    return info.value


def test_class_defaults_become_the_admission(governor):
    a = governor.admit(request(workload_class="code"))
    assert (a.workload_class, a.classified, a.speculate, a.max_draft, a.confidence_floor, a.scheduler_mode) == \
        ("code", False, True, 7, 0.3, "hardware_aware")
    assert (a.temperature, a.top_p, a.top_k, a.max_new_tokens, a.probe) == (0.0, 1.0, 0, 128, False)
    assert a.request_id == "req-1" and governor.in_flight == 1
    b = governor.admit(request(workload_class="chat", request_id="mine", max_new_tokens=64))
    assert (b.request_id, b.max_draft, b.temperature, b.top_k, b.max_new_tokens) == ("mine", 4, 0.7, 40, 64)
    r = governor.admit(request(tenant="bank", workload_class="regulated"))
    assert (r.speculate, r.max_draft, r.scheduler_mode) == (False, 0, "off")


def test_classifier_assigns_a_class_the_tenant_may_use(governor):
    a = governor.admit(request(prompt_text="```python\nprint(1)\n```"))
    assert a.workload_class == "code" and a.classified
    assert governor.admit(request(tenant="bank", prompt_text="About the lawsuit")).workload_class == "regulated"
    # acme may not use 'regulated': that rule is skipped, no other matches -> classifier default 'chat'.
    assert governor.admit(request(prompt_text="About the lawsuit")).workload_class == "chat"


def test_allowed_overrides(governor):
    a = governor.admit(request(workload_class="code", overrides={"max_draft": 3}, temperature=0.4))
    assert (a.max_draft, a.temperature) == (3, 0.4)
    a = governor.admit(request(workload_class="code", overrides={"max_draft": 0}))
    assert (a.speculate, a.max_draft, a.scheduler_mode) == (False, 0, "off")
    a = governor.admit(request(workload_class="chat", overrides={"speculate": False}))
    assert (a.speculate, a.max_draft, a.scheduler_mode) == (False, 0, "off")
    a = governor.admit(request(workload_class="chat", overrides={"scheduler_mode": "fixed"}, top_p=0.9, top_k=10))
    assert (a.scheduler_mode, a.top_p, a.top_k) == ("fixed", 0.9, 10)
    # A sampling value equal to the class default is not an override.
    assert governor.admit(request(workload_class="code", top_p=1.0, top_k=0)).top_p == 1.0


@pytest.mark.parametrize("kw,code,message", [
    (dict(workload_class="code", overrides={"confidence_floor": 0.1}), "override_forbidden",
     "does not allow overriding 'confidence_floor'"),
    (dict(workload_class="code", top_p=0.9), "override_forbidden", "does not allow overriding 'top_p'"),
    (dict(workload_class="chat", temperature=0.2), "override_forbidden", "does not allow overriding 'temperature'"),
    (dict(workload_class="code", overrides={"max_draft": 9}), "invalid_override", "an integer in [0, 7]"),
    (dict(workload_class="chat", overrides={"scheduler_mode": "turbo"}), "invalid_override", "one of hardware_aware"),
    (dict(workload_class="chat", overrides={"speculate": "yes"}), "invalid_override", "true or false"),
    (dict(workload_class="code", overrides={"seed": 1}), "invalid_override", "unknown override 'seed'"),
    (dict(workload_class="code", overrides={"temperature": 0.1}), "invalid_override", "as request fields"),
    (dict(workload_class="code", temperature=0.8), "sampling_limit", "temperature 0.8 is outside [0, 0.5]"),
    (dict(workload_class="chat", top_p=0.3), "sampling_limit", "top_p 0.3 is outside [0.5, 1]"),
    (dict(workload_class="chat", top_k=0), "sampling_limit", "top_k 0 is outside [1, 50]"),
    (dict(workload_class="chat", top_k=60), "sampling_limit", "top_k 60 is outside [1, 50]"),
    (dict(workload_class="code", max_new_tokens=300), "sampling_limit", "max_new_tokens 300 exceeds the cap of 256"),
    (dict(workload_class="code", prompt_tokens=1001), "context_budget", "exceeds the context budget of 1000"),
    (dict(tenant="nobody"), "unknown_tenant", "unknown tenant 'nobody'"),
    (dict(workload_class="poetry"), "unknown_class", "unknown workload class 'poetry'"),
    (dict(workload_class="regulated"), "class_not_allowed", "tenant 'acme' may not use workload class 'regulated'"),
    (dict(prompt_tokens=-1), "invalid_request", "prompt_tokens must be an integer >= 0"),
    (dict(max_new_tokens=0), "invalid_request", "max_new_tokens must be an integer >= 1"),
])
def test_rejections(governor, kw, code, message):
    e = rejected(governor, **kw)
    assert e.code == code and message in e.reason and str(e) == e.reason
    assert governor.in_flight == 0


def test_rejections_are_counted_with_bounded_labels(governor):
    for kw in (dict(tenant="nobody"), dict(tenant="someone-else", workload_class="x"), dict(workload_class="poetry"),
               dict(workload_class="code", prompt_tokens=5000), dict(tenant="z", prompt_tokens=-1)):
        rejected(governor, **kw)
    snap = governor.snapshot()
    assert snap["by_tenant"]["<unknown>"]["rejections"] == {"invalid_request": 1, "unknown_tenant": 2}
    assert snap["by_class"]["<unknown>"]["rejections"] == {"unknown_class": 1, "unknown_tenant": 1}
    assert set(snap["by_tenant"]) == {"<unknown>", "acme"} and set(snap["by_class"]) == {
        "<unknown>", "<unclassified>", "code"}
    assert snap["by_class"]["code"]["rejections"] == {"context_budget": 1}
    assert snap["totals"]["rejected"] == 5 and snap["totals"]["admitted"] == 0


def test_engine_event_errors(governor):
    a = governor.admit(request(workload_class="code", request_id="x"))
    with pytest.raises(ValueError, match="already in flight"):
        governor.admit(request(workload_class="code", request_id="x"))
    with pytest.raises(ValueError, match="accepted <= verified_draft"):
        governor.record_round(a.request_id, verified_draft=2, accepted=3, committed=3)
    with pytest.raises(ValueError, match="without a draft"):
        governor.record_round(a.request_id, verified_draft=2, accepted=0, committed=1, drafted=False)
    governor.record_finish(a.request_id, prompt_tokens=10, output_tokens=5, latency_s=0.5)
    with pytest.raises(KeyError, match="unknown request id 'x'"):
        governor.record_round("x", verified_draft=1, accepted=1, committed=2)
    with pytest.raises(KeyError, match="unknown request id"):
        governor.record_finish("x", prompt_tokens=1, output_tokens=1, latency_s=1.0)

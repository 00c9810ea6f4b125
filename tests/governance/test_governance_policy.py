"""Governance policy files: the shipped example loads; every kind of mistake gives an error naming file and field."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from dspark_jax.governance import PolicyError, load_policy, policy_from_dict
from dspark_jax.governance.classifier import PromptClassifier
from dspark_jax.governance.policy import GovernancePolicy

REPO = Path(__file__).resolve().parents[2]
DEFAULT_POLICY = REPO / "configs" / "policies" / "default.yaml"

MINIMAL = {
    "gamma": 7,
    "cost_per_hour_usd": 300.0,
    "class_defaults": {"max_draft": 5, "rollback": {"threshold": 0.3, "window": 10}},
    "classes": {
        "code": {"max_draft": 7, "allow_overrides": ["max_draft"]},
        "chat": {"sampling": {"default_temperature": 0.7}},
        "regulated": {"speculate": False, "max_draft": 0, "scheduler_mode": "off", "rollback": None},
    },
    "tenants": {"acme": {"classes": ["code", "chat"], "quotas": [{"tokens": 1000, "window_s": 60}]}},
}


def write_yaml(tmp_path: Path, data, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_change(path: tuple, value) -> dict:
    """MINIMAL with the field at `path` set to `value` (a missing final key is added)."""
    data = copy.deepcopy(MINIMAL)
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return data


def test_default_policy_loads_and_is_frozen():
    policy = load_policy(DEFAULT_POLICY)
    assert isinstance(policy, GovernancePolicy)
    assert set(policy.class_names) >= {"code", "extraction", "math", "summarization", "chat", "creative", "regulated"}
    regulated = policy.workload_class("regulated")
    assert regulated.speculate is False and regulated.rollback is None and regulated.scheduler_mode == "off"
    code = policy.workload_class("code")
    assert code.max_draft == 7 and code.rollback.threshold == 0.4 and code.rollback.window == 200  # merged default
    assert policy.tenant("research").quotas[1].count == "output"
    with pytest.raises(dataclasses.FrozenInstanceError):
        code.max_draft = 3


def test_the_name_default_loads_the_shipped_policy_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the package's copy
    shipped, repo = load_policy("default"), load_policy(DEFAULT_POLICY)
    assert shipped.source.endswith("dspark_jax/governance/policies/default.yaml")
    assert dataclasses.replace(shipped, source=repo.source) == repo
    (tmp_path / "default").write_text("a file of that name wins")
    with pytest.raises(PolicyError, match="unsupported policy file type"):
        load_policy("default")


def test_class_defaults_merge_and_builtin_defaults(tmp_path):
    policy = load_policy(write_yaml(tmp_path, MINIMAL))
    code, chat, regulated = (policy.workload_class(n) for n in ("code", "chat", "regulated"))
    assert (code.max_draft, chat.max_draft) == (7, 5)
    assert chat.sampling.default_temperature == 0.7 and code.sampling.default_temperature == 0.0
    assert chat.rollback.threshold == 0.3 and chat.rollback.window == 10 and chat.rollback.probe_window == 10
    assert chat.rollback.probation_s == 300.0 and chat.rollback.probe_fraction == 0.1  # built-in defaults
    assert regulated.rollback is None
    assert policy.tenant("acme").default_class == "chat"  # the classifier's default (chat) is allowed
    assert policy.tenant("acme").quotas[0].count == "total"
    assert policy.classifier.default_class == "chat"
    assert {r.workload_class for r in policy.classifier.rules} == {"code", "regulated"}  # built-in rules, filtered


def test_python_policy_file(tmp_path):
    path = tmp_path / "policy.py"
    path.write_text(f"POLICY = {MINIMAL!r}\n")
    assert load_policy(path).class_names == ("code", "chat", "regulated")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(PolicyError, match=r"empty\.py: defines no POLICY"):
        load_policy(tmp_path / "empty.py")
    (tmp_path / "broken.py").write_text("POLICY = {\n")
    with pytest.raises(PolicyError, match=r"broken\.py: error while executing the policy file: SyntaxError"):
        load_policy(tmp_path / "broken.py")


@pytest.mark.parametrize("path,value,message", [
    # unknown fields, with a suggestion when one is close
    (("classes", "code", "max_drft"), 3, r"classes\.code\.max_drft: unknown field \(did you mean 'max_draft'\?\)"),
    (("tenants", "acme", "budget"), 3, r"tenants\.acme\.budget: unknown field \(expected one of"),
    (("classes", "code", "sampling", "temp"), 1, r"classes\.code\.sampling\.temp: unknown field"),
    (("colour",), "red", r"policy\.yaml: colour: unknown field"),
    # bad ranges
    (("classes", "code", "max_draft"), 9, r"classes\.code\.max_draft: must be an integer in \[0, 7\] \(0\.\.gamma\), "
                                          r"got 9"),
    (("classes", "chat", "confidence_floor"), 1.5, r"classes\.chat\.confidence_floor: must be a number in \[0, 1\]"),
    (("class_defaults", "rollback", "probe_fraction"), 0, r"class_defaults\.rollback\.probe_fraction: must be a "
                                                          r"number in \(0, 1\]"),
    (("classes", "chat", "rollback"), {"threshold": 1.5}, r"classes\.chat\.rollback\.threshold: an acceptance "
                                                          r"threshold must be in \[0, 1\]"),
    (("classes", "chat", "sampling", "default_temperature"), 3.0,
     r"classes\.chat\.sampling\.default_temperature: 3 is above max_temperature 2"),
    (("classes", "chat", "sampling", "top_p_range"), [0.9, 0.5], r"top_p_range: must be \[lo, hi\]"),
    (("tenants", "acme", "quotas"), [{"tokens": 0, "window_s": 60}], r"tenants\.acme\.quotas\[0\]\.tokens: must be "
                                                                     r"an integer >= 1, got 0"),
    (("gamma",), "seven", r"gamma: must be an integer >= 1, got 'seven'"),
    (("classes", "code", "speculate"), "yes", r"classes\.code\.speculate: must be true or false"),
    # unknown choices
    (("classes", "code", "scheduler_mode"), "adaptive",
     r"classes\.code\.scheduler_mode: must be one of hardware_aware, static_threshold, fixed, off; got 'adaptive'"),
    (("classes", "regulated", "scheduler_mode"), False, r"write \"off\" in quotes"),
    (("classes", "code", "allow_overrides"), ["max_draft", "seed"], r"classes\.code\.allow_overrides\[1\]: must be "
                                                                    r"one of"),
    (("tenants", "acme", "quotas"), [{"tokens": 5, "window_s": 60, "count": "input"}], r"quotas\[0\]\.count: must be"),
    # unknown class references
    (("tenants", "acme", "classes"), ["code", "cod"], r"tenants\.acme\.classes\[1\]: unknown class 'cod' \(defined "
                                                      r"classes: code, chat, regulated\)"),
    (("tenants", "acme", "default_class"), "regulated", r"tenants\.acme\.default_class: 'regulated' is not one of"),
    (("classifier",), {"rules": [{"class": "poetry", "patterns": ["poem"]}]}, r"classifier\.rules\[0\]\.class: "
                                                                              r"unknown class 'poetry'"),
    (("classifier",), {"rules": [{"class": "code", "patterns": ["def ("]}]}, r"classifier\.rules\[0\]\.patterns\[0\]: "
                                                                             r"invalid regular expression"),
    # inconsistent settings
    (("classes", "code", "scheduler_mode"), "off", r"classes\.code\.scheduler_mode: is 'off' but speculate is true"),
    (("classes", "chat", "max_draft"), 0, r"classes\.chat\.max_draft: is 0 but speculate is true"),
    (("classes", "chat", "rollback"), {"metric": "p95_latency_s"}, None),  # valid: threshold comes from defaults
    (("version",), 2, r"version: unsupported policy version 2"),
])
def test_validation_errors_name_file_and_field(tmp_path, path, value, message):
    file = write_yaml(tmp_path, with_change(path, value))
    if message is None:
        load_policy(file)
        return
    with pytest.raises(PolicyError, match=message) as info:
        load_policy(file)
    assert str(info.value).startswith(f"{file}: ")


def test_missing_required_fields(tmp_path):
    data = copy.deepcopy(MINIMAL)
    del data["cost_per_hour_usd"]
    with pytest.raises(PolicyError, match=r"policy\.yaml: cost_per_hour_usd: required field missing"):
        load_policy(write_yaml(tmp_path, data))
    data = copy.deepcopy(MINIMAL)
    del data["class_defaults"]["rollback"]["threshold"]
    with pytest.raises(PolicyError, match=r"classes\.code\.rollback\.threshold: required field missing"):
        load_policy(write_yaml(tmp_path, data))
    with pytest.raises(PolicyError, match=r"<dict>: tenants: must be a non-empty mapping"):
        policy_from_dict(with_change(("tenants",), {}))


def test_every_type_error_is_reported_at_once(tmp_path):
    """pydantic checks the whole file: each invalid field gets its own line, each line names file and field."""
    data = with_change(("classes", "code", "speculate"), "yes")
    data["gamma"] = 7.0
    data["tenants"]["acme"]["quotas"] = [{"tokens": 10}]
    file = write_yaml(tmp_path, data)
    with pytest.raises(PolicyError) as info:
        load_policy(file)
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{file}: ") for line in lines)
    assert any(line.endswith("gamma: must be an integer >= 1, got 7.0") for line in lines)
    assert any(line.endswith("classes.code.speculate: must be true or false, got 'yes'") for line in lines)
    assert any(line.endswith("tenants.acme.quotas[0].window_s: required field missing") for line in lines)
    assert len(lines) == 3
    with pytest.raises(PolicyError, match=r"<dict>: classes: invalid name 1 \(names are strings"):
        policy_from_dict(dict(copy.deepcopy(MINIMAL), classes={1: {}}))


def test_missing_file_malformed_yaml_and_wrong_type(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"policy file not found: .*nope\.yaml"):
        load_policy(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("gamma: 7\nclasses:\n  code: {max_draft: [1, 2}\n")
    with pytest.raises(PolicyError, match=r"bad\.yaml:3:\d+: malformed YAML"):
        load_policy(bad)
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(PolicyError, match=r"empty\.yaml: the policy file is empty"):
        load_policy(tmp_path / "empty.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(PolicyError, match=r"list\.yaml: must be a mapping, got list"):
        load_policy(tmp_path / "list.yaml")
    (tmp_path / "policy.toml").write_text("gamma = 7\n")
    with pytest.raises(PolicyError, match=r"unsupported policy file type '\.toml'"):
        load_policy(tmp_path / "policy.toml")


def test_classifier_rules_order_default_and_tenant_restriction():
    policy = load_policy(DEFAULT_POLICY)
    c = PromptClassifier(policy.classifier)
    cases = {
        "def fib(n):\n    return n": "code",
        "Please fix the bug in this function": "code",
        "Extract the names and dates as JSON": "extraction",
        "How many apples are left if 3 of 10 are eaten?": "math",
        "Summarize the meeting notes below": "summarization",
        "Write a poem about the sea": "creative",
        "What dosage of ibuprofen should I take? Also write a python script": "regulated",  # regulated wins
        "Hi! How are you today?": "chat",
    }
    for prompt, expected in cases.items():
        assert c.classify(prompt) == expected, prompt
    # Only the tenant's classes are considered; the classifier default if allowed, else the tenant default.
    assert c.classify("Write a poem in python", allowed=("creative", "chat")) == "creative"
    assert c.classify("Summarize this", allowed=("code", "chat"), tenant_default="code") == "chat"
    assert c.classify("Summarize this", allowed=("code", "math"), tenant_default="code") == "code"
    # Long prompts: the instruction at the end still counts, text in the middle does not.
    long = "lorem ipsum " * 5000
    assert c.classify(long + "\nSummarize the text above.") == "summarization"
    assert c.classify(long[:30000] + " write a poem " + long[:30000]) == "chat"

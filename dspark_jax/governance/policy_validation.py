"""Validating a governance policy given as plain data (the schema of `policy_file`) into the frozen
`policy.GovernancePolicy`; every error is a PolicyError naming the source and the field."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any, Callable

from dspark_jax.governance.classifier import DEFAULT_RULES
from dspark_jax.governance.policy import (
    OVERRIDABLE, QUOTA_COUNTS, ROLLBACK_METRICS, SCHEDULER_MODES, STORE_ERROR_POLICIES, ClassifierConfig,
    ClassifierRule, GovernancePolicy, QuotaRule, RollbackRule, SamplingLimits, StoreSettings, TenantPolicy,
    WorkloadClassPolicy)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TOP_FIELDS = ("version", "gamma", "cost_per_hour_usd", "class_defaults", "classes", "tenants", "classifier",
              "store")
STORE_FIELDS = tuple(StoreSettings.__dataclass_fields__)
STORE_SCHEMES = ("redis://", "rediss://", "unix://")
CLASS_FIELDS = ("speculate", "max_draft", "confidence_floor", "scheduler_mode", "max_prompt_tokens",
                "allow_overrides", "sampling", "rollback", "description")
SAMPLING_FIELDS = tuple(SamplingLimits.__dataclass_fields__)
ROLLBACK_FIELDS = ("metric", "threshold", "window", "probation_s", "probe_fraction", "probe_window")
ROLLBACK_BUILTIN = dict(metric="acceptance", window=100, probation_s=300.0, probe_fraction=0.1)
TENANT_FIELDS = ("classes", "default_class", "quotas", "description")
QUOTA_FIELDS = ("tokens", "window_s", "count")
CLASSIFIER_FIELDS = ("default_class", "rules")
RULE_FIELDS = ("class", "patterns")


class PolicyError(ValueError):
    """An invalid policy; the message names the file and the field."""


class _Context:
    """Where we are in the policy: the source file and a field path, for error messages."""

    def __init__(self, source: str, path: str = ""):
        self.source, self.path = source, path

    def at(self, key: str | int) -> "_Context":
        if isinstance(key, int):
            return _Context(self.source, f"{self.path}[{key}]")
        return _Context(self.source, f"{self.path}.{key}" if self.path else key)

    def error(self, message: str) -> PolicyError:
        where = f"{self.source}: {self.path}" if self.path else self.source
        return PolicyError(f"{where}: {message}")


def _mapping(value: Any, ctx: _Context, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise ctx.error(f"must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (expected one of: {', '.join(allowed)})"
            raise ctx.at(str(key)).error(f"unknown field{hint}")
    return value


def _bool(value: Any, ctx: _Context) -> bool:
    if not isinstance(value, bool):
        raise ctx.error(f"must be true or false, got {value!r}")
    return value


def _int(value: Any, ctx: _Context, lo: int | None = None, hi: int | None = None, note: str = "") -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (lo is None or value >= lo) and (hi is None or value <= hi):
        return value
    rng = (f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}") if lo is not None else ""
    raise ctx.error(f"must be an integer{rng}{note}, got {value!r}")


def _float(value: Any, ctx: _Context, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           note: str = "") -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi):
        return float(value)
    if lo is None:
        rng = ""
    elif hi is None:
        rng = f" {'>' if lo_open else '>='} {lo:g}"
    else:
        rng = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    raise ctx.error(f"must be a number{rng}{note}, got {value!r}")


def _choice(value: Any, ctx: _Context, choices: tuple[str, ...]) -> str:
    if isinstance(value, bool) or value not in choices:
        hint = ' (a bare off / on / yes / no is a YAML boolean: write "off" in quotes)' if isinstance(value, bool) \
            else ""
        raise ctx.error(f"must be one of {', '.join(choices)}; got {value!r}{hint}")
    return value


def _str(value: Any, ctx: _Context) -> str:
    if not isinstance(value, str):
        raise ctx.error(f"must be a string, got {value!r}")
    return value


def _name(value: Any, ctx: _Context, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ctx.error(f"invalid {what} name {value!r} (letters, digits, '_', '.', '-'; not starting with "
                        f"a punctuation mark)")
    return value


def _list(value: Any, ctx: _Context) -> list:
    if not isinstance(value, list):
        raise ctx.error(f"must be a list, got {value!r}")
    return value


def _optional(parse: Callable[[Any, _Context], Any]) -> Callable[[Any, _Context], Any]:
    return lambda value, ctx: None if value is None else parse(value, ctx)


def _sampling_parsers() -> dict[str, Callable[[Any, _Context], Any]]:
    def top_p_range(value, ctx):
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or not 0.0 <= value[0] <= value[1] <= 1.0):
            raise ctx.error(f"must be [lo, hi] with 0 <= lo <= hi <= 1, got {value!r}")
        return float(value[0]), float(value[1])

    return dict(
        default_temperature=lambda v, c: _float(v, c, lo=0.0),
        max_temperature=lambda v, c: _float(v, c, lo=0.0),
        default_top_p=lambda v, c: _float(v, c, lo=0.0, hi=1.0, lo_open=True),
        top_p_range=top_p_range,
        default_top_k=lambda v, c: _int(v, c, lo=0),
        max_top_k=_optional(lambda v, c: _int(v, c, lo=1)),
        default_max_new_tokens=lambda v, c: _int(v, c, lo=1),
        max_new_tokens=lambda v, c: _int(v, c, lo=1),
    )


def _rollback_parsers() -> dict[str, Callable[[Any, _Context], Any]]:
    return dict(
        metric=lambda v, c: _choice(v, c, ROLLBACK_METRICS),
        threshold=lambda v, c: _float(v, c, lo=0.0),
        window=lambda v, c: _int(v, c, lo=1),
        probation_s=lambda v, c: _float(v, c, lo=0.0, lo_open=True),
        probe_fraction=lambda v, c: _float(v, c, lo=0.0, hi=1.0, lo_open=True),
        probe_window=_optional(lambda v, c: _int(v, c, lo=1)),
    )


def _class_parsers(gamma: int) -> dict[str, Callable[[Any, _Context], Any]]:
    def allow_overrides(value, ctx):
        items = tuple(_choice(v, ctx.at(i), OVERRIDABLE) for i, v in enumerate(_list(value, ctx)))
        return tuple(dict.fromkeys(items))

    return dict(
        speculate=_bool,
        max_draft=lambda v, c: _int(v, c, lo=0, hi=gamma, note=" (0..gamma)"),
        confidence_floor=lambda v, c: _float(v, c, lo=0.0, hi=1.0),
        scheduler_mode=lambda v, c: _choice(v, c, SCHEDULER_MODES),
        max_prompt_tokens=_optional(lambda v, c: _int(v, c, lo=1)),
        allow_overrides=allow_overrides,
        description=_str,
    )


def _parse_section(raw: dict, ctx: _Context, parsers: dict, base: dict) -> dict:
    """Validated values of `raw`'s fields, falling back to `base` for the fields it does not set."""
    values = dict(base)
    for key, value in raw.items():
        if key in parsers:
            values[key] = parsers[key](value, ctx.at(key))
    return values


def _class_defaults(raw: Any, ctx: _Context, gamma: int) -> dict:
    """Validated class_defaults: plain class fields, plus 'sampling' and 'rollback' as dicts of validated values."""
    raw = _mapping(raw, ctx, CLASS_FIELDS)
    base = dict(speculate=True, max_draft=gamma, confidence_floor=0.0, scheduler_mode="hardware_aware",
                max_prompt_tokens=None, allow_overrides=(), description="")
    values = _parse_section(raw, ctx, _class_parsers(gamma), base)
    sampling = _mapping(raw.get("sampling", {}), ctx.at("sampling"), SAMPLING_FIELDS)
    values["sampling"] = _parse_section(sampling, ctx.at("sampling"), _sampling_parsers(),
                                        SamplingLimits().__dict__)
    rollback = raw.get("rollback")
    if rollback is None:
        values["rollback"] = None
    else:
        rollback = _mapping(rollback, ctx.at("rollback"), ROLLBACK_FIELDS)
        values["rollback"] = _parse_section(rollback, ctx.at("rollback"), _rollback_parsers(), ROLLBACK_BUILTIN)
    return values


def _sampling_limits(values: dict, ctx: _Context) -> SamplingLimits:
    s = SamplingLimits(**values)
    if s.default_temperature > s.max_temperature:
        raise ctx.at("default_temperature").error(
            f"{s.default_temperature:g} is above max_temperature {s.max_temperature:g}")
    lo, hi = s.top_p_range
    if not lo <= s.default_top_p <= hi:
        raise ctx.at("default_top_p").error(f"{s.default_top_p:g} is outside top_p_range [{lo:g}, {hi:g}]")
    if s.max_top_k is not None and not 1 <= s.default_top_k <= s.max_top_k:
        raise ctx.at("default_top_k").error(
            f"must be in [1, max_top_k={s.max_top_k}] (0 = off is not allowed when max_top_k is set), "
            f"got {s.default_top_k}")
    if s.default_max_new_tokens > s.max_new_tokens:
        raise ctx.at("default_max_new_tokens").error(
            f"{s.default_max_new_tokens} is above max_new_tokens {s.max_new_tokens}")
    return s


def _rollback_rule(values: dict, ctx: _Context) -> RollbackRule:
    if "threshold" not in values:
        raise ctx.at("threshold").error("required field missing (set it here or in class_defaults.rollback)")
    if values["metric"] == "acceptance" and values["threshold"] > 1.0:
        raise ctx.at("threshold").error(f"an acceptance threshold must be in [0, 1], got {values['threshold']:g}")
    probe_window = values.get("probe_window") or values["window"]
    return RollbackRule(metric=values["metric"], threshold=values["threshold"], window=values["window"],
                        probation_s=values["probation_s"], probe_fraction=values["probe_fraction"],
                        probe_window=probe_window)


def _workload_class(name: str, raw: Any, ctx: _Context, gamma: int, defaults: dict) -> WorkloadClassPolicy:
    raw = _mapping({} if raw is None else raw, ctx, CLASS_FIELDS)
    values = _parse_section(raw, ctx, _class_parsers(gamma), {k: v for k, v in defaults.items()
                                                              if k not in ("sampling", "rollback")})
    sampling_raw = _mapping(raw.get("sampling", {}), ctx.at("sampling"), SAMPLING_FIELDS)
    sampling = _sampling_limits(
        _parse_section(sampling_raw, ctx.at("sampling"), _sampling_parsers(), defaults["sampling"]), ctx.at("sampling"))
    rollback = None
    if "rollback" in raw and raw["rollback"] is None:
        rollback = None
    elif "rollback" in raw or defaults["rollback"] is not None:
        rollback_raw = _mapping(raw.get("rollback", {}), ctx.at("rollback"), ROLLBACK_FIELDS)
        base = defaults["rollback"] if defaults["rollback"] is not None else ROLLBACK_BUILTIN
        rollback = _rollback_rule(_parse_section(rollback_raw, ctx.at("rollback"), _rollback_parsers(), base),
                                  ctx.at("rollback"))
    if values["speculate"]:
        if values["scheduler_mode"] == "off":
            raise ctx.at("scheduler_mode").error("is 'off' but speculate is true (set speculate: false)")
        if values["max_draft"] == 0:
            raise ctx.at("max_draft").error("is 0 but speculate is true (set speculate: false)")
    return WorkloadClassPolicy(name=name, sampling=sampling, rollback=rollback, **values)


def _quota(raw: Any, ctx: _Context) -> QuotaRule:
    raw = _mapping(raw, ctx, QUOTA_FIELDS)
    for key in ("tokens", "window_s"):
        if key not in raw:
            raise ctx.at(key).error("required field missing")
    return QuotaRule(tokens=_int(raw["tokens"], ctx.at("tokens"), lo=1),
                     window_s=_float(raw["window_s"], ctx.at("window_s"), lo=0.0, lo_open=True),
                     count=_choice(raw.get("count", "total"), ctx.at("count"), QUOTA_COUNTS))


def _tenant(name: str, raw: Any, ctx: _Context, class_names: tuple[str, ...], fallback_class: str) -> TenantPolicy:
    raw = _mapping(raw, ctx, TENANT_FIELDS)
    if "classes" not in raw:
        raise ctx.at("classes").error('required field missing (a list of class names, or "*" for all)')
    if raw["classes"] == "*":
        classes = class_names
    else:
        items = _list(raw["classes"], ctx.at("classes"))
        if not items:
            raise ctx.at("classes").error("must name at least one class")
        for i, c in enumerate(items):
            if c not in class_names:
                raise ctx.at("classes").at(i).error(
                    f"unknown class {c!r} (defined classes: {', '.join(class_names)})")
        classes = tuple(dict.fromkeys(items))
    quotas = tuple(_quota(q, ctx.at("quotas").at(i)) for i, q in enumerate(_list(raw.get("quotas", []),
                                                                                  ctx.at("quotas"))))
    default_class = raw.get("default_class")
    if default_class is None:
        default_class = fallback_class if fallback_class in classes else classes[0]
    elif default_class not in classes:
        raise ctx.at("default_class").error(f"{default_class!r} is not one of this tenant's classes "
                                            f"({', '.join(classes)})")
    return TenantPolicy(name=name, classes=classes, quotas=quotas, default_class=default_class,
                        description=_str(raw.get("description", ""), ctx.at("description")))


def _classifier(raw: Any, ctx: _Context, class_names: tuple[str, ...]) -> ClassifierConfig:
    raw = _mapping({} if raw is None else raw, ctx, CLASSIFIER_FIELDS)
    fallback = "chat" if "chat" in class_names else class_names[0]
    default_class = raw.get("default_class", fallback)
    if default_class not in class_names:
        raise ctx.at("default_class").error(f"unknown class {default_class!r} (defined classes: "
                                            f"{', '.join(class_names)})")
    if "rules" not in raw:
        rules = tuple(r for r in DEFAULT_RULES if r.workload_class in class_names)
        return ClassifierConfig(default_class=default_class, rules=rules)
    rules = []
    for i, rule in enumerate(_list(raw["rules"], ctx.at("rules"))):
        rctx = ctx.at("rules").at(i)
        rule = _mapping(rule, rctx, RULE_FIELDS)
        for key in RULE_FIELDS:
            if key not in rule:
                raise rctx.at(key).error("required field missing")
        if rule["class"] not in class_names:
            raise rctx.at("class").error(f"unknown class {rule['class']!r} (defined classes: "
                                         f"{', '.join(class_names)})")
        patterns = _list(rule["patterns"], rctx.at("patterns"))
        if not patterns:
            raise rctx.at("patterns").error("must list at least one regular expression")
        for j, p in enumerate(patterns):
            _str(p, rctx.at("patterns").at(j))
            try:
                re.compile(p)
            except re.error as e:
                raise rctx.at("patterns").at(j).error(f"invalid regular expression {p!r}: {e}") from None
        rules.append(ClassifierRule(workload_class=rule["class"], patterns=tuple(patterns)))
    return ClassifierConfig(default_class=default_class, rules=tuple(rules))


def store_settings(raw: Any, ctx: _Context) -> StoreSettings:
    """Validated `store` section (also used for `dspark serve --quota_store`)."""
    raw = _mapping({} if raw is None else raw, ctx, STORE_FIELDS)
    values = dict(StoreSettings().__dict__)
    if "url" in raw:
        url = _str(raw["url"], ctx.at("url"))
        if url != "memory" and not url.startswith(STORE_SCHEMES):
            raise ctx.at("url").error(f"must be 'memory' or a Redis URL ({', '.join(STORE_SCHEMES)}...), got {url!r}")
        values["url"] = url
    if "on_error" in raw:
        values["on_error"] = _choice(raw["on_error"], ctx.at("on_error"), STORE_ERROR_POLICIES)
    for key in ("lease_s", "sync_s"):
        if key in raw:
            values[key] = _float(raw[key], ctx.at(key), lo=0.0, lo_open=key == "lease_s")
    if "key_prefix" in raw:
        values["key_prefix"] = _name(raw["key_prefix"], ctx.at("key_prefix"), "key prefix")
    return StoreSettings(**values)


def with_store_url(policy: GovernancePolicy, url: str) -> GovernancePolicy:
    """The policy with its store moved to `url` ('memory' or a Redis URL; PolicyError when it is neither)."""
    settings = store_settings(dict(policy.store.__dict__, url=url), _Context("--quota_store"))
    return dataclasses.replace(policy, store=settings)


def policy_from_dict(data: Any, source: str = "<dict>") -> GovernancePolicy:
    """Validates a policy given as plain data (the file schema above) and returns the frozen policy."""
    ctx = _Context(source)
    data = _mapping(data, ctx, TOP_FIELDS)
    if "version" in data and data["version"] != 1:
        raise ctx.at("version").error(f"unsupported policy version {data['version']!r} (only 1 exists)")
    for key in ("gamma", "cost_per_hour_usd", "classes", "tenants"):
        if key not in data:
            raise ctx.at(key).error("required field missing")
    gamma = _int(data["gamma"], ctx.at("gamma"), lo=1)
    cost = _float(data["cost_per_hour_usd"], ctx.at("cost_per_hour_usd"), lo=0.0)
    defaults = _class_defaults(data.get("class_defaults", {}) or {}, ctx.at("class_defaults"), gamma)
    classes_raw = data["classes"]
    if not isinstance(classes_raw, dict) or not classes_raw:
        raise ctx.at("classes").error("must be a non-empty mapping of class name -> class settings")
    classes = tuple(_workload_class(_name(name, ctx.at("classes"), "class"), raw, ctx.at("classes").at(name), gamma,
                                    defaults) for name, raw in classes_raw.items())
    class_names = tuple(c.name for c in classes)
    classifier = _classifier(data.get("classifier"), ctx.at("classifier"), class_names)
    tenants_raw = data["tenants"]
    if not isinstance(tenants_raw, dict) or not tenants_raw:
        raise ctx.at("tenants").error("must be a non-empty mapping of tenant name -> tenant settings")
    tenants = tuple(_tenant(_name(name, ctx.at("tenants"), "tenant"), raw, ctx.at("tenants").at(name), class_names,
                            classifier.default_class) for name, raw in tenants_raw.items())
    store = store_settings(data.get("store"), ctx.at("store"))
    return GovernancePolicy(gamma=gamma, cost_per_hour_usd=cost, classes=classes, tenants=tenants,
                            classifier=classifier, store=store, source=source)

"""Validating a governance policy given as plain data into the frozen `policy.GovernancePolicy`: pydantic checks
types, ranges and allowed fields (`policy_schema`); a small pass turns its errors into PolicyErrors that name
the source and the field (with a did-you-mean for unknown fields); then sections are merged (classes inherit
`class_defaults`) and what spans fields or sections is checked here."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError

from dspark_jax.governance.classifier import DEFAULT_RULES
from dspark_jax.governance.policy import (ClassifierConfig, ClassifierRule, GovernancePolicy, QuotaRule, RollbackRule,
                                          SamplingLimits, StoreSettings, TenantPolicy, WorkloadClassPolicy)
from dspark_jax.governance.policy_schema import (ClassSection, ClassifierSection, PolicyFile, SamplingSection,
                                                 StoreSection, TenantSection, set_fields)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STORE_SCHEMES = ("redis://", "rediss://", "unix://")
ROLLBACK_BUILTIN = dict(metric="acceptance", window=100, probation_s=300.0, probe_fraction=0.1)
MISSING_HINTS = {(TenantSection, "classes"): ' (a list of class names, or "*" for all)'}


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


# ---- pydantic's errors in our words --------------------------------------------------------------------------

def _strip(annotation: Any) -> tuple[Any, list]:
    """(type, constraints) of an annotation: Optional and Annotated unwrapped."""
    constraints = []
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation, *extra = typing.get_args(annotation)
            for e in extra:
                constraints += getattr(e, "metadata", [e])
        elif origin in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation, constraints
            annotation = rest[0]
        else:
            return annotation, constraints


def _walk(model: type[BaseModel], loc: tuple) -> tuple[Any, list, type[BaseModel] | None, str | None]:
    """The schema at `loc`: (type, constraints, the section owning the last field, its name); the type is None
    past a field the schema does not have."""
    annotation, constraints, owner, name = model, [], None, None
    for key in loc:
        annotation, extra = _strip(annotation)
        constraints = extra
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = {f.alias or n: f for n, f in annotation.model_fields.items()}
            owner, name = annotation, str(key)
            if key not in fields:
                return None, [], owner, name
            annotation, constraints = fields[key].annotation, list(fields[key].metadata)
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        elif typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        else:
            return None, [], owner, name
    annotation, extra = _strip(annotation)
    return annotation, constraints + extra, owner, name


def _range(constraints: list, fmt) -> str:
    lo = next(((c.ge, False) for c in constraints if isinstance(c, annotated_types.Ge)),
              next(((c.gt, True) for c in constraints if isinstance(c, annotated_types.Gt)), None))
    hi = next((c.le for c in constraints if isinstance(c, annotated_types.Le)), None)
    if lo is None:
        return ""
    if hi is None:
        return f" {'>' if lo[1] else '>='} {fmt(lo[0])}"
    return f" in {'(' if lo[1] else '['}{fmt(lo[0])}, {fmt(hi)}]"


def _expected(annotation: Any, constraints: list, value: Any) -> str:
    """What a field of this type must be, in the words of the policy file's documentation."""
    if annotation is bool:
        return "must be true or false"
    if annotation is int:
        return f"must be an integer{_range(constraints, lambda v: f'{v:d}')}"
    if annotation is float:
        return f"must be a number{_range(constraints, lambda v: f'{v:g}')}"
    if typing.get_origin(annotation) is typing.Literal:
        hint = ' (a bare off / on / yes / no is a YAML boolean: write "off" in quotes)' if isinstance(value, bool) \
            else ""
        return f"must be one of {', '.join(map(str, typing.get_args(annotation)))}; got {value!r}{hint}"
    if annotation is str:
        return "must be a string"
    if typing.get_origin(annotation) is list:
        return "must be a list"
    return "must be a mapping"


def _message(error: dict) -> tuple[tuple, str]:
    """(field path, message) of one pydantic error."""
    if "[key]" in error["loc"]:  # a mapping key that is not a string (YAML reads `1:` as an integer)
        loc = error["loc"][:error["loc"].index("[key]") - 1]
        return loc, f"invalid name {error.get('input')!r} (names are strings: letters, digits, '_', '.', '-')"
    loc = error["loc"]
    annotation, constraints, owner, name = _walk(PolicyFile, loc)
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        allowed = [f.alias or n for n, f in owner.model_fields.items()]
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(allowed)}"
        return loc, f"unknown field ({hint})"
    if kind == "missing":
        return loc, "required field missing" + MISSING_HINTS.get((owner, name), "")
    expected = _expected(annotation, constraints, value)
    if "; got" in expected:
        return loc, expected
    if expected == "must be a mapping":
        return loc, f"{expected}, got {type(value).__name__}"
    return loc, f"{expected}, got {value!r}"


def _validate(model: type[BaseModel], data: Any, ctx: _Context):
    """`model` validated from `data`; a PolicyError naming every invalid field (one per line) otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for error in e.errors():
            loc, message = _message(error)
            where = ctx
            for key in loc:
                where = where.at(key)
            lines.append(str(where.error(message)))
        raise PolicyError("\n".join(lines)) from None


# ---- what spans fields and sections ------------------------------------------------------------------------

def _name(value: Any, ctx: _Context, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ctx.error(f"invalid {what} name {value!r} (letters, digits, '_', '.', '-'; not starting with "
                        f"a punctuation mark)")
    return value


def _top_p_range(value: Any, ctx: _Context) -> tuple[float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not 0.0 <= value[0] <= value[1] <= 1.0):
        raise ctx.error(f"must be [lo, hi] with 0 <= lo <= hi <= 1, got {value!r}")
    return float(value[0]), float(value[1])


def _sampling_fields(section: SamplingSection | None, ctx: _Context) -> dict:
    values = set_fields(section)
    if "top_p_range" in values:
        values["top_p_range"] = _top_p_range(values["top_p_range"], ctx.at("top_p_range"))
    return values


def _class_fields(section: ClassSection | None, ctx: _Context, gamma: int) -> dict:
    """The plain (non-section) fields a class section sets, checked against gamma."""
    values = {k: v for k, v in set_fields(section).items() if k not in ("sampling", "rollback")}
    if values.get("max_draft", 0) > gamma:
        raise ctx.at("max_draft").error(f"must be an integer in [0, {gamma}] (0..gamma), got {values['max_draft']}")
    if "allow_overrides" in values:
        values["allow_overrides"] = tuple(dict.fromkeys(values["allow_overrides"]))
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
    return RollbackRule(metric=values["metric"], threshold=values["threshold"], window=values["window"],
                        probation_s=values["probation_s"], probe_fraction=values["probe_fraction"],
                        probe_window=values.get("probe_window") or values["window"])


@dataclasses.dataclass(frozen=True)
class _ClassDefaults:
    """class_defaults merged over the built-in defaults: what every class inherits."""
    fields: dict
    sampling: dict
    rollback: dict | None

    @staticmethod
    def of(section: ClassSection | None, ctx: _Context, gamma: int) -> "_ClassDefaults":
        fields = dict(speculate=True, max_draft=gamma, confidence_floor=0.0, scheduler_mode="hardware_aware",
                      max_prompt_tokens=None, allow_overrides=(), description="")
        fields.update(_class_fields(section, ctx, gamma))
        given = set_fields(section)
        sampling = dict(SamplingLimits().__dict__, **_sampling_fields(given.get("sampling"), ctx.at("sampling")))
        rollback = None if given.get("rollback") is None else dict(ROLLBACK_BUILTIN, **set_fields(given["rollback"]))
        return _ClassDefaults(fields, sampling, rollback)


def _workload_class(name: str, section: ClassSection | None, ctx: _Context, gamma: int,
                    defaults: _ClassDefaults) -> WorkloadClassPolicy:
    values = dict(defaults.fields, **_class_fields(section, ctx, gamma))
    given = set_fields(section)
    sampling = _sampling_limits(dict(defaults.sampling, **_sampling_fields(given.get("sampling"), ctx.at("sampling"))),
                                ctx.at("sampling"))
    rollback = None
    if "rollback" in given and given["rollback"] is None:
        rollback = None
    elif "rollback" in given or defaults.rollback is not None:
        base = defaults.rollback if defaults.rollback is not None else ROLLBACK_BUILTIN
        rollback = _rollback_rule(dict(base, **set_fields(given.get("rollback"))), ctx.at("rollback"))
    if values["speculate"]:
        if values["scheduler_mode"] == "off":
            raise ctx.at("scheduler_mode").error("is 'off' but speculate is true (set speculate: false)")
        if values["max_draft"] == 0:
            raise ctx.at("max_draft").error("is 0 but speculate is true (set speculate: false)")
    return WorkloadClassPolicy(name=name, sampling=sampling, rollback=rollback, **values)


def _tenant(name: str, section: TenantSection, ctx: _Context, class_names: tuple[str, ...],
            fallback_class: str) -> TenantPolicy:
    if section.classes == "*":
        classes = class_names
    else:
        if not isinstance(section.classes, list):
            raise ctx.at("classes").error(f'must be a list of class names or "*", got {section.classes!r}')
        if not section.classes:
            raise ctx.at("classes").error("must name at least one class")
        for i, c in enumerate(section.classes):
            if c not in class_names:
                raise ctx.at("classes").at(i).error(
                    f"unknown class {c!r} (defined classes: {', '.join(class_names)})")
        classes = tuple(dict.fromkeys(section.classes))
    quotas = tuple(QuotaRule(tokens=q.tokens, window_s=float(q.window_s), count=q.count) for q in section.quotas)
    default_class = section.default_class
    if default_class is None:
        default_class = fallback_class if fallback_class in classes else classes[0]
    elif default_class not in classes:
        raise ctx.at("default_class").error(f"{default_class!r} is not one of this tenant's classes "
                                            f"({', '.join(classes)})")
    return TenantPolicy(name=name, classes=classes, quotas=quotas, default_class=default_class,
                        description=section.description)


def _classifier(section: ClassifierSection | None, ctx: _Context, class_names: tuple[str, ...]) -> ClassifierConfig:
    given = set_fields(section)
    default_class = given.get("default_class", "chat" if "chat" in class_names else class_names[0])
    if default_class not in class_names:
        raise ctx.at("default_class").error(f"unknown class {default_class!r} (defined classes: "
                                            f"{', '.join(class_names)})")
    if "rules" not in given:
        rules = tuple(r for r in DEFAULT_RULES if r.workload_class in class_names)
        return ClassifierConfig(default_class=default_class, rules=rules)
    rules = []
    for i, rule in enumerate(given["rules"]):
        rctx = ctx.at("rules").at(i)
        if rule.workload_class not in class_names:
            raise rctx.at("class").error(f"unknown class {rule.workload_class!r} (defined classes: "
                                         f"{', '.join(class_names)})")
        if not rule.patterns:
            raise rctx.at("patterns").error("must list at least one regular expression")
        for j, p in enumerate(rule.patterns):
            try:
                re.compile(p)
            except re.error as e:
                raise rctx.at("patterns").at(j).error(f"invalid regular expression {p!r}: {e}") from None
        rules.append(ClassifierRule(workload_class=rule.workload_class, patterns=tuple(rule.patterns)))
    return ClassifierConfig(default_class=default_class, rules=tuple(rules))


def _store_settings(section: StoreSection | None, ctx: _Context) -> StoreSettings:
    values = set_fields(section)
    url = values.get("url")
    if url is not None and url != "memory" and not url.startswith(STORE_SCHEMES):
        raise ctx.at("url").error(f"must be 'memory' or a Redis URL ({', '.join(STORE_SCHEMES)}...), got {url!r}")
    if "key_prefix" in values:
        _name(values["key_prefix"], ctx.at("key_prefix"), "key prefix")
    return StoreSettings(**{k: float(v) if k.endswith("_s") else v for k, v in values.items()})


def with_store_url(policy: GovernancePolicy, url: str) -> GovernancePolicy:
    """The policy with its store moved to `url` ('memory' or a Redis URL; PolicyError when it is neither)."""
    ctx = _Context("--quota_store")
    settings = _store_settings(_validate(StoreSection, dict(policy.store.__dict__, url=url), ctx), ctx)
    return dataclasses.replace(policy, store=settings)


def policy_from_dict(data: Any, source: str = "<dict>") -> GovernancePolicy:
    """Validates a policy given as plain data (the schema of `policy_file`) and returns the frozen policy.
    Raises PolicyError naming `source` and the field."""
    ctx = _Context(source)
    raw = _validate(PolicyFile, data, ctx)
    if raw.version != 1:
        raise ctx.at("version").error(f"unsupported policy version {raw.version!r} (only 1 exists)")
    defaults = _ClassDefaults.of(raw.class_defaults, ctx.at("class_defaults"), raw.gamma)
    if not raw.classes:
        raise ctx.at("classes").error("must be a non-empty mapping of class name -> class settings")
    classes = tuple(_workload_class(_name(name, ctx.at("classes"), "class"), section, ctx.at("classes").at(name),
                                    raw.gamma, defaults) for name, section in raw.classes.items())
    class_names = tuple(c.name for c in classes)
    classifier = _classifier(raw.classifier, ctx.at("classifier"), class_names)
    if not raw.tenants:
        raise ctx.at("tenants").error("must be a non-empty mapping of tenant name -> tenant settings")
    tenants = tuple(_tenant(_name(name, ctx.at("tenants"), "tenant"), section, ctx.at("tenants").at(name), class_names,
                            classifier.default_class) for name, section in raw.tenants.items())
    return GovernancePolicy(gamma=raw.gamma, cost_per_hour_usd=float(raw.cost_per_hour_usd), classes=classes,
                            tenants=tenants, classifier=classifier, store=_store_settings(raw.store, ctx.at("store")),
                            source=source)

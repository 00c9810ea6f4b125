"""The policy file's schema as pydantic v2 models: types, ranges and allowed fields of every section (strict:
no coercion — "yes" is not a boolean, 7.0 is not an integer). A field a section does not set keeps its
schema default (None: "inherit"); `policy_validation` merges sections with `model_fields_set`, checks what
spans fields or sections (class references, gamma, default vs limit) and builds the frozen
`policy.GovernancePolicy`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dspark_jax.governance.policy import (OVERRIDABLE, QUOTA_COUNTS, ROLLBACK_METRICS, SCHEDULER_MODES,
                                          STORE_ERROR_POLICIES)

AtLeastOne = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
UnitClosed = Annotated[float, Field(ge=0, le=1)]
UnitOpen = Annotated[float, Field(gt=0, le=1)]


class Section(BaseModel):
    """A mapping with exactly these fields, validated without coercion."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=False)


class SamplingSection(Section):
    default_temperature: NonNegative = None
    max_temperature: NonNegative = None
    default_top_p: UnitOpen = None
    top_p_range: Any = None  # [lo, hi]: checked by policy_validation (one message for every way it is wrong)
    default_top_k: NonNegativeInt = None
    max_top_k: AtLeastOne | None = None
    default_max_new_tokens: AtLeastOne = None
    max_new_tokens: AtLeastOne = None


class RollbackSection(Section):
    metric: Literal[ROLLBACK_METRICS] = None
    threshold: NonNegative = None
    window: AtLeastOne = None
    probation_s: Positive = None
    probe_fraction: UnitOpen = None
    probe_window: AtLeastOne | None = None


class ClassSection(Section):
    speculate: bool = None
    max_draft: NonNegativeInt = None  # at most gamma: checked by policy_validation
    confidence_floor: UnitClosed = None
    scheduler_mode: Literal[SCHEDULER_MODES] = None
    max_prompt_tokens: AtLeastOne | None = None
    allow_overrides: list[Literal[OVERRIDABLE]] = None
    sampling: SamplingSection = None
    rollback: RollbackSection | None = None
    description: str = None


class QuotaSection(Section):
    tokens: AtLeastOne
    window_s: Positive
    count: Literal[QUOTA_COUNTS] = "total"


class TenantSection(Section):
    classes: Any  # a list of class names or "*": checked against the classes by policy_validation
    default_class: str | None = None
    quotas: list[QuotaSection] = []
    description: str = ""


class RuleSection(Section):
    workload_class: str = Field(alias="class")
    patterns: list[str]


class ClassifierSection(Section):
    default_class: str = None
    rules: list[RuleSection] = None


class StoreSection(Section):
    url: str = None
    on_error: Literal[STORE_ERROR_POLICIES] = None
    lease_s: Positive = None
    sync_s: NonNegative = None
    key_prefix: str = None


class PolicyFile(Section):
    version: int = 1
    gamma: AtLeastOne
    cost_per_hour_usd: NonNegative
    class_defaults: ClassSection | None = None
    classes: dict[str, ClassSection | None]
    tenants: dict[str, TenantSection]
    classifier: ClassifierSection | None = None
    store: StoreSection | None = None


def set_fields(section: BaseModel | None) -> dict[str, Any]:
    """The fields a section sets explicitly (an absent section sets none), sub-sections as models."""
    if section is None:
        return {}
    return {name: getattr(section, name) for name in section.model_fields_set}

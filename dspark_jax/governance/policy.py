"""The governance policy: admin-owned, frozen settings per workload class and per tenant.

A policy is loaded from a YAML or Python file by `dspark_jax.governance.policy_file.load_policy`, which
validates every field; the dataclasses here hold the validated result and never change afterwards.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from dspark_jax.serving.requests import DRAFT_MODES

SCHEDULER_MODES = DRAFT_MODES  # the engine's request draft modes (`serving.requests`)
"""How the engine sizes each draft of a speculating request:
hardware_aware   -- draft length chosen per round from the profiled throughput curve and the drafter's
                    confidence, at most `max_draft`, never verifying a token below `confidence_floor`;
static_threshold -- cut the draft at the first position whose confidence is below `confidence_floor`
                    (at most `max_draft` tokens);
fixed            -- always propose `max_draft` tokens (confidence ignored);
off              -- no speculation (plain decoding)."""

ROLLBACK_METRICS = ("acceptance", "p95_latency_s")
"""acceptance     -- accepted draft tokens / verified draft tokens over the last `window` verification rounds
                     that verified at least one draft token; rolls back when it falls BELOW the threshold;
p95_latency_s  -- 95th percentile end-to-end latency (seconds) of the last `window` finished speculating
                     requests; rolls back when it rises ABOVE the threshold."""

QUOTA_COUNTS = ("total", "output")
"""total  -- a request is charged prompt tokens + output tokens;
output -- a request is charged output tokens only."""

STORE_ERROR_POLICIES = ("reject", "allow")
"""What admission does while the shared store (Redis) cannot be reached:
reject -- refuse requests of tenants with quotas (code store_unavailable, HTTP 503): never over quota;
allow  -- admit them without a reservation and charge their tokens when the store returns: never refuses."""

OVERRIDABLE = ("speculate", "max_draft", "confidence_floor", "scheduler_mode", "temperature", "top_p", "top_k")
"""Settings a request may change when its class lists them in `allow_overrides`. The first four come in the
request's `overrides` dict; the sampling ones are the request's own temperature / top_p / top_k fields (a value
equal to the class default is not an override). `max_new_tokens` is the request's length, never an override:
it is only capped by `sampling.max_new_tokens`."""


@dataclass(frozen=True)
class SamplingLimits:
    """Sampling defaults (used when a request leaves a field unset) and the limits a request must stay within."""
    default_temperature: float = 0.0
    max_temperature: float = 2.0
    default_top_p: float = 1.0
    top_p_range: tuple[float, float] = (0.0, 1.0)  # a request's top_p must satisfy lo <= top_p <= hi (and > 0)
    default_top_k: int = 0  # 0 = no top-k truncation
    max_top_k: int | None = None  # None = any top_k (0 included); N = top_k must be in [1, N]
    default_max_new_tokens: int = 512
    max_new_tokens: int = 4096


@dataclass(frozen=True)
class RollbackRule:
    """When to switch a class to plain decoding, and how to probe it back (see ROLLBACK_METRICS)."""
    metric: str
    threshold: float
    window: int  # verification rounds (acceptance) or finished requests (p95_latency_s)
    probation_s: float  # seconds of plain decoding before probing
    probe_fraction: float  # share of the class's requests that speculate while probing, in (0, 1]
    probe_window: int  # probe rounds / requests needed to decide (defaults to `window`)

    def is_healthy(self, value: float) -> bool:
        return value >= self.threshold if self.metric == "acceptance" else value <= self.threshold


@dataclass(frozen=True)
class WorkloadClassPolicy:
    """Speculation and sampling policy of one workload class (code, chat, regulated, ...)."""
    name: str
    speculate: bool
    max_draft: int  # 0..gamma draft tokens per verification round
    confidence_floor: float  # 0..1
    scheduler_mode: str  # one of SCHEDULER_MODES
    sampling: SamplingLimits
    max_prompt_tokens: int | None  # context budget; None = unlimited
    allow_overrides: tuple[str, ...]  # subset of OVERRIDABLE
    rollback: RollbackRule | None  # None = never rolled back automatically
    description: str = ""


@dataclass(frozen=True)
class QuotaRule:
    """At most `tokens` tokens per fixed window of `window_s` seconds (see QUOTA_COUNTS for what is counted)."""
    tokens: int
    window_s: float
    count: str = "total"


@dataclass(frozen=True)
class TenantPolicy:
    """A tenant (team, app, environment): the classes it may use and its token quotas."""
    name: str
    classes: tuple[str, ...]
    quotas: tuple[QuotaRule, ...]
    default_class: str  # used when no classifier rule for an allowed class matches
    description: str = ""


@dataclass(frozen=True)
class ClassifierRule:
    """Prompts matching any of `patterns` (case-insensitive regular expressions, searched) get `workload_class`."""
    workload_class: str
    patterns: tuple[str, ...]


@dataclass(frozen=True)
class ClassifierConfig:
    """Ordered rules, first match wins; `default_class` when none matches."""
    default_class: str
    rules: tuple[ClassifierRule, ...]


@dataclass(frozen=True)
class StoreSettings:
    """Where quota usage and rollback states live. url 'memory': in this process only (one replica); a Redis URL
    (redis://host:port/db, rediss://, unix://): shared by every replica using it (governance.redis_store)."""
    url: str = "memory"
    on_error: str = "reject"  # one of STORE_ERROR_POLICIES
    lease_s: float = 30.0  # a reservation not renewed for this long (its replica died) is given back
    sync_s: float = 0.5  # how often a replica re-reads the shared rollback states (at most this stale)
    key_prefix: str = "dspark"

    @property
    def shared(self) -> bool:
        return self.url != "memory"


@dataclass(frozen=True)
class GovernancePolicy:
    """The whole policy. `source` names the file it was loaded from (for messages)."""
    gamma: int  # the drafter's block size: upper bound of every max_draft
    cost_per_hour_usd: float  # all-in serving cost of the pool, for cost per token / request
    classes: tuple[WorkloadClassPolicy, ...]
    tenants: tuple[TenantPolicy, ...]
    classifier: ClassifierConfig
    store: StoreSettings = StoreSettings()
    source: str = "<dict>"

    @functools.cached_property
    def _classes_by_name(self) -> dict[str, WorkloadClassPolicy]:
        return {c.name: c for c in self.classes}

    @functools.cached_property
    def _tenants_by_name(self) -> dict[str, TenantPolicy]:
        return {t.name: t for t in self.tenants}

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def tenant_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tenants)

    def workload_class(self, name: str) -> WorkloadClassPolicy | None:
        return self._classes_by_name.get(name)

    def tenant(self, name: str) -> TenantPolicy | None:
        return self._tenants_by_name.get(name)

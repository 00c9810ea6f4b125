"""The Governor: admission control, per-request speculation settings, usage metering and automatic rollback.

The serving engine calls, per request:
    admission = governor.admit(GovernedRequest(...))          # or RequestRejected
    governor.record_start(admission.request_id)               # when its prefill begins (optional, see below)
    governor.record_round(admission.request_id, ...)          # after every verification round / plain step
    governor.record_finish(admission.request_id, ...)         # when it ends, successfully or not

`now` defaults to the governor's clock (injectable; `time.time` by default). A request counts as running (for
busy time and cost, see costs.py) from `record_start`, or from its first round if the engine never calls
`record_start`, until `record_finish`. All methods are thread-safe.

Quota usage and rollback states live in the policy's store (store.py): this process by default, or a Redis shared
by every replica (`store.url`). While a shared store is unreachable, admission of tenants with quotas follows
`store.on_error` (reject: code store_unavailable; allow: admitted, charged when the store returns).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from dspark_jax.governance.classifier import PromptClassifier
from dspark_jax.governance.costs import BusyTimeAccountant
from dspark_jax.governance.metrics import UsageCell, summarize
from dspark_jax.governance.policy import (SCHEDULER_MODES, GovernancePolicy, QuotaRule, StoreSettings,
                                          WorkloadClassPolicy)
from dspark_jax.governance.policy_file import load_policy
from dspark_jax.governance.policy_validation import with_store_url
from dspark_jax.governance.prometheus import render_prometheus
from dspark_jax.governance.quotas import QuotaExceeded, QuotaLedger
from dspark_jax.governance.redis_store import open_redis_store
from dspark_jax.governance.rollback import SPECULATIVE, RollbackController, SwitchEvent
from dspark_jax.governance.snapshot import SNAPSHOT_SCHEMA, write_snapshot
from dspark_jax.governance.store import GovernanceStore, LocalRollbackStates, StoreHealth, StoreUnavailable

UNKNOWN = "<unknown>"  # metric label of a tenant or class name not in the policy (bounds label cardinality)
UNCLASSIFIED = "<unclassified>"  # metric label of a request rejected before it had a class
DISABLED = "disabled"  # class state when its policy has speculation off
REQUEST_OVERRIDES = ("speculate", "max_draft", "confidence_floor", "scheduler_mode")
REJECTION_CODES = ("invalid_request", "unknown_tenant", "unknown_class", "class_not_allowed", "context_budget",
                   "invalid_override", "override_forbidden", "sampling_limit", "quota_exceeded", "store_unavailable")


def open_store(settings: StoreSettings, quotas: Mapping[str, Sequence[QuotaRule]],
               clock: Callable[[], float] = time.time) -> GovernanceStore:
    """The store `settings.url` names: this process ('memory'), or a Redis shared by replicas (connected lazily:
    an unreachable Redis at start is an outage like any other, handled by `on_error`, not a start failure)."""
    if not settings.shared:
        return GovernanceStore(settings, QuotaLedger(quotas), LocalRollbackStates(), StoreHealth())
    return open_redis_store(settings, quotas, clock)


class RequestRejected(Exception):
    """A request refused at admission. `code` is one of REJECTION_CODES; `reason` explains it to the client;
    `retry_after_s`: seconds until the quota window resets (quota_exceeded), or until the store is retried
    (store_unavailable)."""

    def __init__(self, reason: str, code: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.reason, self.code, self.retry_after_s = reason, code, retry_after_s


@dataclass(frozen=True, kw_only=True)
class GovernedRequest:
    """What the engine knows about a request at admission. Unset sampling fields take the class defaults;
    `workload_class=None` lets the classifier choose from `prompt_text`; `overrides` may set the keys in
    REQUEST_OVERRIDES where the class allows it; `request_id=None` lets the governor number the request."""
    tenant: str
    prompt_tokens: int
    prompt_text: str = ""
    workload_class: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None


@dataclass(frozen=True)
class Admission:
    """The effective settings of an admitted request. With speculate False, max_draft is 0 and
    scheduler_mode 'off'. `probe` marks a speculating request of a class that is being probed after a rollback."""
    request_id: str
    tenant: str
    workload_class: str
    classified: bool  # the class came from the classifier (the request named none)
    speculate: bool
    max_draft: int
    confidence_floor: float
    scheduler_mode: str
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    probe: bool


@dataclass
class _InFlight:
    admission: Admission
    epoch: int  # the class's rollback epoch at admission


class Governor:
    """Enforces a GovernancePolicy for a serving engine and meters its usage; see the module docstring."""

    def __init__(self, policy: GovernancePolicy, clock: Callable[[], float] = time.time,
                 store: GovernanceStore | None = None):
        """store None: the one `policy.store` names (in-process by default)."""
        self.policy, self.clock = policy, clock
        self._lock = threading.RLock()
        self._classifier = PromptClassifier(policy.classifier)
        self.store = store or open_store(policy.store, {t.name: t.quotas for t in policy.tenants if t.quotas},
                                         clock)
        self._quotas = self.store.quotas
        self._busy = BusyTimeAccountant()
        self._cells: dict[tuple[str, str], UsageCell] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._switches: list[SwitchEvent] = []  # the store's switch log as last read
        self._controllers = {c.name: RollbackController(c.name, c.rollback, self.store.rollback,
                                                        self.store.settings.sync_s)
                             for c in policy.classes if c.rollback is not None and c.speculate}
        self._ids = itertools.count(1)

    def close(self) -> None:
        """Releases the store (a Redis store stops renewing its leases and settles what it can)."""
        self.store.close()

    @classmethod
    def from_policy_file(cls, path: str | Path, clock: Callable[[], float] = time.time,
                         store_url: str | None = None) -> "Governor":
        """store_url: overrides the file's `store.url` ('memory' or a Redis URL)."""
        policy = load_policy(path)
        return cls(with_store_url(policy, store_url) if store_url else policy, clock)

    # -- admission ---------------------------------------------------------------------------------------------
    def admit(self, request: GovernedRequest, now: float | None = None) -> Admission:
        """The request's effective settings, with its worst-case tokens reserved against the tenant's quotas;
        raises RequestRejected (nothing reserved) when the policy refuses it."""
        with self._lock:
            now = self.clock() if now is None else now
            # Metric labels: names the policy knows, else a fixed placeholder (clients cannot add label values).
            label_tenant = request.tenant if self.policy.tenant(request.tenant) is not None else UNKNOWN
            label_class = (UNCLASSIFIED if request.workload_class is None else request.workload_class
                           if self.policy.workload_class(request.workload_class) is not None else UNKNOWN)
            try:
                if request.request_id is not None and request.request_id in self._in_flight:
                    raise ValueError(f"request id {request.request_id!r} is already in flight")
                _check_request(request)
                tenant = self.policy.tenant(request.tenant)
                if tenant is None:
                    raise RequestRejected(f"unknown tenant {request.tenant!r}", "unknown_tenant")
                if request.workload_class is None:
                    name = self._classifier.classify(request.prompt_text, tenant.classes, tenant.default_class)
                    label_class = name
                else:
                    name = request.workload_class
                    if self.policy.workload_class(name) is None:
                        raise RequestRejected(f"unknown workload class {name!r} (classes: "
                                              f"{', '.join(self.policy.class_names)})", "unknown_class")
                    if name not in tenant.classes:
                        raise RequestRejected(f"tenant {tenant.name!r} may not use workload class {name!r} "
                                              f"(allowed: {', '.join(tenant.classes)})", "class_not_allowed")
                cls = self.policy.workload_class(name)
                admission = self._settings(request, cls)
                request_id = request.request_id or self._new_id()
                admission = dataclasses.replace(admission, request_id=request_id,
                                                classified=request.workload_class is None)
                try:
                    self._quotas.reserve(request_id, tenant.name, request.prompt_tokens, admission.max_new_tokens,
                                         now)
                except QuotaExceeded as e:
                    raise RequestRejected(str(e), "quota_exceeded", e.retry_after_s) from None
                except StoreUnavailable as e:
                    if self.store.settings.on_error == "reject":
                        raise RequestRejected(f"the quota store is unavailable ({e}); retry shortly",
                                              "store_unavailable", self.store.health.retry_s) from None
                    self._quotas.admit_unreserved(request_id, tenant.name)
            except RequestRejected as e:
                self._cell(label_class, label_tenant).add_rejection(e.code)
                raise
            epoch = 0
            controller = self._controllers.get(cls.name)
            if admission.speculate and controller is not None:
                allowed, probe, epoch = controller.admit(now)
                admission = dataclasses.replace(admission, probe=probe)
                if not allowed:
                    admission = dataclasses.replace(admission, speculate=False, max_draft=0, scheduler_mode="off")
            self._in_flight[request_id] = _InFlight(admission, epoch)
            self._cell(cls.name, tenant.name).counts["admitted"] += 1
            return admission

    def _settings(self, request: GovernedRequest, cls: WorkloadClassPolicy) -> Admission:
        """Effective settings from the class policy, the allowed overrides and the sampling limits."""
        if cls.max_prompt_tokens is not None and request.prompt_tokens > cls.max_prompt_tokens:
            raise RequestRejected(f"prompt of {request.prompt_tokens} tokens exceeds the context budget of "
                                  f"{cls.max_prompt_tokens} tokens of workload class {cls.name!r}", "context_budget")
        allowed = set(cls.allow_overrides)
        for key, value in request.overrides.items():
            if key not in REQUEST_OVERRIDES:
                hint = (" (give temperature / top_p / top_k as request fields)" if key in ("temperature", "top_p",
                                                                                           "top_k") else "")
                raise RequestRejected(f"unknown override {key!r}{hint}; overridable: {', '.join(REQUEST_OVERRIDES)}",
                                      "invalid_override")
            if key not in allowed:
                raise RequestRejected(f"workload class {cls.name!r} does not allow overriding {key!r}",
                                      "override_forbidden")
            _check_override(key, value, self.policy.gamma)
        s = cls.sampling
        sampling = {}
        for key, default in (("temperature", s.default_temperature), ("top_p", s.default_top_p),
                             ("top_k", s.default_top_k)):
            value = getattr(request, key)
            if value is not None and value != default and key not in allowed:
                raise RequestRejected(f"workload class {cls.name!r} does not allow overriding {key!r} (its "
                                      f"default is {default})", "override_forbidden")
            sampling[key] = default if value is None else value
        _check_sampling(cls, sampling["temperature"], sampling["top_p"], sampling["top_k"])
        max_new_tokens = s.default_max_new_tokens if request.max_new_tokens is None else request.max_new_tokens
        if max_new_tokens > s.max_new_tokens:
            raise RequestRejected(f"max_new_tokens {max_new_tokens} exceeds the cap of {s.max_new_tokens} of "
                                  f"workload class {cls.name!r}", "sampling_limit")
        o = request.overrides
        speculate = o.get("speculate", cls.speculate)
        max_draft = o.get("max_draft", cls.max_draft)
        mode = o.get("scheduler_mode", cls.scheduler_mode)
        if max_draft == 0 or mode == "off":
            speculate = False
        if not speculate:
            max_draft, mode = 0, "off"
        return Admission(request_id="", tenant=request.tenant, workload_class=cls.name, classified=False,
                         speculate=speculate, max_draft=max_draft,
                         confidence_floor=float(o.get("confidence_floor", cls.confidence_floor)),
                         scheduler_mode=mode, max_new_tokens=max_new_tokens, probe=False,
                         temperature=float(sampling["temperature"]), top_p=float(sampling["top_p"]),
                         top_k=int(sampling["top_k"]))

    def _new_id(self) -> str:
        while True:
            request_id = f"req-{next(self._ids)}"
            if request_id not in self._in_flight:
                return request_id

    def _cell(self, workload_class: str, tenant: str) -> UsageCell:
        return self._cells.setdefault((workload_class, tenant), UsageCell())

    def _entry(self, request_id: str) -> _InFlight:
        entry = self._in_flight.get(request_id)
        if entry is None:
            raise KeyError(f"unknown request id {request_id!r} (not admitted, or already finished)")
        return entry

    # -- engine events -----------------------------------------------------------------------------------------
    def record_start(self, request_id: str, now: float | None = None) -> None:
        """The request starts running (its prefill begins): its busy time counts from here."""
        with self._lock:
            a = self._entry(request_id).admission
            self._busy.start(request_id, (a.workload_class, a.tenant), self.clock() if now is None else now)

    def record_round(self, request_id: str, *, verified_draft: int, accepted: int, committed: int,
                     drafted: bool = True, now: float | None = None) -> None:
        """One verification round: `verified_draft` draft tokens verified, `accepted` of them accepted,
        `committed` tokens appended to the output (accepted + the target's bonus/correction token, fewer at a
        stop). A plain decoding step (no draft) is a round with drafted=False and verified_draft=accepted=0."""
        if not (0 <= accepted <= verified_draft and committed >= 0):
            raise ValueError(f"need 0 <= accepted <= verified_draft and committed >= 0, got verified_draft="
                             f"{verified_draft}, accepted={accepted}, committed={committed}")
        if not drafted and verified_draft:
            raise ValueError(f"a round without a draft cannot verify draft tokens (verified_draft={verified_draft})")
        with self._lock:
            now = self.clock() if now is None else now
            entry = self._entry(request_id)
            a = entry.admission
            self._busy.start(request_id, (a.workload_class, a.tenant), now)
            self._cell(a.workload_class, a.tenant).add_round(verified_draft, accepted, committed, drafted)
            controller = self._controllers.get(a.workload_class)
            if drafted and a.speculate and controller is not None:
                controller.record_round(entry.epoch, a.probe, verified_draft, accepted, now)

    def record_finish(self, request_id: str, *, prompt_tokens: int, output_tokens: int, latency_s: float,
                      first_token_s: float | None = None, ok: bool = True, now: float | None = None) -> None:
        """The request ended (ok=False: error, timeout or cancellation). Releases its quota reservation and
        charges the actual `prompt_tokens + output_tokens` (or output only, per the tenant's quota)."""
        if prompt_tokens < 0 or output_tokens < 0 or latency_s < 0 or (first_token_s is not None
                                                                         and first_token_s < 0):
            raise ValueError(f"token counts and times must be >= 0, got prompt_tokens={prompt_tokens}, "
                             f"output_tokens={output_tokens}, latency_s={latency_s}, first_token_s={first_token_s}")
        with self._lock:
            now = self.clock() if now is None else now
            entry = self._entry(request_id)
            a = entry.admission
            del self._in_flight[request_id]
            self._busy.stop(request_id, now)
            self._quotas.reconcile(request_id, prompt_tokens, output_tokens, now)
            self._cell(a.workload_class, a.tenant).add_finish(prompt_tokens, output_tokens, latency_s, first_token_s,
                                                              ok, a.speculate, a.probe)
            controller = self._controllers.get(a.workload_class)
            if ok and a.speculate and controller is not None:
                controller.record_request(entry.epoch, a.probe, latency_s, now)

    # -- state and reports -------------------------------------------------------------------------------------
    def class_state(self, workload_class: str, now: float | None = None) -> str:
        """'speculative', 'rolled_back', 'probing', or 'disabled' (the class policy has speculation off)."""
        with self._lock:
            cls = self.policy.workload_class(workload_class)
            if cls is None:
                raise KeyError(f"unknown workload class {workload_class!r}")
            if not cls.speculate:
                return DISABLED
            controller = self._controllers.get(workload_class)
            if controller is None:
                return SPECULATIVE
            controller.refresh(self.clock() if now is None else now)
            return controller.state

    @property
    def switches(self) -> tuple[SwitchEvent, ...]:
        """Every class's switches, oldest first (with a shared store: those of every replica)."""
        with self._lock:
            return tuple(self._read_switches())

    def _read_switches(self) -> list[SwitchEvent]:
        try:
            self._switches = self.store.rollback.events()
        except StoreUnavailable:
            pass  # the last log read
        return self._switches

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def snapshot(self, now: float | None = None) -> dict:
        """A JSON-ready view of everything: usage and costs per group / class / tenant / total, class states,
        switches and quotas (schema SNAPSHOT_SCHEMA)."""
        with self._lock:
            now = self.clock() if now is None else now
            self._busy.advance(now)
            cph = self.policy.cost_per_hour_usd
            busy = self._busy.by_group
            groups = [dict({"class": c, "tenant": t}, **summarize([cell], busy.get((c, t), 0.0), cph))
                      for (c, t), cell in sorted(self._cells.items())]

            def grouped(index: int) -> dict:
                keys = sorted({k[index] for k in self._cells})
                return {key: summarize([cell for k, cell in self._cells.items() if k[index] == key],
                                       sum(v for k, v in busy.items() if k[index] == key), cph) for key in keys}

            classes = {}
            for cls in self.policy.classes:
                controller = self._controllers.get(cls.name)
                status = controller.status(now) if controller is not None else None
                state = DISABLED if not cls.speculate else status["state"] if status else SPECULATIVE
                classes[cls.name] = dict(state=state, speculate=cls.speculate, max_draft=cls.max_draft,
                                         confidence_floor=cls.confidence_floor, scheduler_mode=cls.scheduler_mode,
                                         rollback=status)
            return _json_safe(dict(
                schema=SNAPSHOT_SCHEMA, time=now, policy_source=self.policy.source, gamma=self.policy.gamma,
                cost_per_hour_usd=cph, in_flight=len(self._in_flight),
                totals=summarize(list(self._cells.values()), self._busy.busy_seconds, cph),
                by_class=grouped(0), by_tenant=grouped(1), groups=groups, classes=classes,
                switches=[dataclasses.asdict(e) for e in self._read_switches()],
                quotas=self._quota_snapshot(now), store=self.store.describe()))

    def _quota_snapshot(self, now: float) -> dict:
        try:
            return self._quotas.snapshot(now)
        except StoreUnavailable:
            return {}  # unknown while the store is away (store.up is false in the snapshot)

    def prometheus_text(self, now: float | None = None) -> str:
        return render_prometheus(self.snapshot(now))

    def write_snapshot(self, path: str | Path, now: float | None = None) -> Path:
        """Writes snapshot() as JSON, atomically (readers never see a half-written file)."""
        return write_snapshot(path, self.snapshot(now))


def _check_request(r: GovernedRequest) -> None:
    def bad(message: str) -> RequestRejected:
        return RequestRejected(message, "invalid_request")

    if not isinstance(r.prompt_tokens, int) or r.prompt_tokens < 0:
        raise bad(f"prompt_tokens must be an integer >= 0, got {r.prompt_tokens!r}")
    if r.max_new_tokens is not None and (not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 1):
        raise bad(f"max_new_tokens must be an integer >= 1, got {r.max_new_tokens!r}")
    if not isinstance(r.overrides, Mapping):
        raise bad(f"overrides must be a mapping, got {type(r.overrides).__name__}")


def _check_override(key: str, value: Any, gamma: int) -> None:
    def bad(expected: str) -> RequestRejected:
        return RequestRejected(f"override {key}={value!r}: expected {expected}", "invalid_override")

    if key == "speculate" and not isinstance(value, bool):
        raise bad("true or false")
    if key == "max_draft" and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= gamma):
        raise bad(f"an integer in [0, {gamma}]")
    if key == "confidence_floor" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0.0 <= value <= 1.0):
        raise bad("a number in [0, 1]")
    if key == "scheduler_mode" and value not in SCHEDULER_MODES:
        raise bad(f"one of {', '.join(SCHEDULER_MODES)}")


def _check_sampling(cls: WorkloadClassPolicy, temperature: float, top_p: float, top_k: int) -> None:
    s = cls.sampling

    def bad(message: str) -> RequestRejected:
        return RequestRejected(f"{message} (workload class {cls.name!r})", "sampling_limit")

    if not (isinstance(temperature, (int, float)) and 0.0 <= temperature <= s.max_temperature):
        raise bad(f"temperature {temperature} is outside [0, {s.max_temperature:g}]")
    lo, hi = s.top_p_range
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0 and lo <= top_p <= hi):
        raise bad(f"top_p {top_p} is outside [{lo:g}, {hi:g}] (and (0, 1])")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise bad(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if s.max_top_k is not None and not 1 <= top_k <= s.max_top_k:
        raise bad(f"top_k {top_k} is outside [1, {s.max_top_k}] (0 = off is not allowed)")


def _json_safe(value: Any) -> Any:
    """Non-finite floats -> None, so the snapshot is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value

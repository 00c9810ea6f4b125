"""Where a Governor keeps what replicas must agree on: the quota ledger and the per-class rollback states.

A store is a quota ledger (`reserve` / `reconcile` / `admit_unreserved` / `snapshot`, see quotas.QuotaLedger)
plus rollback states (`load` / `switch` / `events`, below), and a StoreHealth that counts failures. The in-process
implementations never fail; the Redis ones (redis_store.py) raise StoreUnavailable while Redis cannot be reached,
and the policy's `store.on_error` decides what admission does then.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from dspark_jax.governance.policy import StoreSettings
from dspark_jax.governance.quotas import QuotaLedger

SPECULATIVE, ROLLED_BACK, PROBING = "speculative", "rolled_back", "probing"
logger = logging.getLogger("dspark_jax.governance")


class StoreUnavailable(Exception):
    """The shared store could not be reached (the message says which operation and why)."""


@dataclass(frozen=True)
class SwitchEvent:
    """One change of a class's speculation state."""
    time: float
    workload_class: str
    from_state: str
    to_state: str
    reason: str
    metric: str
    value: float | None  # the metric value that caused the switch (None for the end of a probation period)
    threshold: float


@dataclass(frozen=True)
class ClassState:
    """A class's speculation state. `epoch` counts its switches: every replica tags the requests it admits with
    it, and a switch applies only to the epoch it was decided in (compare-and-set)."""
    state: str = SPECULATIVE
    epoch: int = 0
    since: float = 0.0
    probation_until: float | None = None


class RollbackStates(Protocol):
    def load(self, workload_class: str) -> ClassState: ...

    def switch(self, expected_epoch: int, new: ClassState, event: SwitchEvent) -> tuple[bool, ClassState]:
        """Applies `new` (and records `event` once) iff the class is still at `expected_epoch`; returns
        (applied, the class's state after the call)."""

    def events(self) -> list[SwitchEvent]: ...


class LocalRollbackStates:
    """Rollback states of this process only."""

    def __init__(self):
        self._lock = threading.Lock()
        self._states: dict[str, ClassState] = {}
        self._events: list[SwitchEvent] = []

    def load(self, workload_class: str) -> ClassState:
        with self._lock:
            return self._states.get(workload_class, ClassState())

    def switch(self, expected_epoch: int, new: ClassState, event: SwitchEvent) -> tuple[bool, ClassState]:
        with self._lock:
            current = self._states.get(event.workload_class, ClassState())
            if current.epoch != expected_epoch:
                return False, current
            self._states[event.workload_class] = new
            self._events.append(event)
            return True, new

    def events(self) -> list[SwitchEvent]:
        with self._lock:
            return list(self._events)


class StoreHealth:
    """Failures of the shared store by operation, and whether its last call succeeded. Logs once when the store
    goes away and once when it returns; while it is away, calls wait `retry_s` between attempts (fail fast)."""

    def __init__(self, retry_s: float = 1.0):
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self.errors: Counter = Counter()
        self.up = True
        self.last_error = ""
        self._retry_at = 0.0

    def check(self, operation: str) -> None:
        """Raises StoreUnavailable without trying while the store is down and the retry time has not come."""
        with self._lock:
            if not self.up and time.monotonic() < self._retry_at:
                self.errors[operation] += 1
                raise StoreUnavailable(f"{operation}: store unavailable ({self.last_error}); retrying shortly")

    def ok(self) -> None:
        with self._lock:
            if not self.up:
                logger.warning("governance store reachable again")
            self.up = True

    def failed(self, operation: str, error: Exception) -> StoreUnavailable:
        with self._lock:
            self.errors[operation] += 1
            self.last_error = f"{type(error).__name__}: {error}"
            if self.up:
                logger.error("governance store unreachable (%s): %s", operation, self.last_error)
            self.up = False
            self._retry_at = time.monotonic() + self.retry_s
            return StoreUnavailable(f"{operation}: {self.last_error}")

    def status(self) -> dict:
        with self._lock:
            return dict(up=self.up, errors=dict(self.errors), last_error=self.last_error or None)


@dataclass
class GovernanceStore:
    """A quota ledger and rollback states of one kind, with their health (see the module docstring)."""
    settings: StoreSettings
    quotas: QuotaLedger  # or redis_store.RedisQuotaLedger: the same methods
    rollback: RollbackStates
    health: StoreHealth
    close: Callable[[], None] = lambda: None

    def describe(self) -> dict:
        """JSON-ready: kind, URL without credentials, error policy, health."""
        return dict(kind="redis" if self.settings.shared else "memory", url=redact(self.settings.url),
                    on_error=self.settings.on_error, lease_s=self.settings.lease_s,
                    pending_settlements=getattr(self.quotas, "pending", 0), **self.health.status())


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.partition(":")[0]
    return f"{scheme}://{user + ':' if user else ':'}***@{host}"


def event_from_dict(data: Mapping) -> SwitchEvent:
    return SwitchEvent(**{f.name: data[f.name] for f in dataclasses.fields(SwitchEvent)})

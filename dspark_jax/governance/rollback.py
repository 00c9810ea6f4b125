"""Automatic rollback of one workload class from speculative to plain decoding, and probing it back.

States and switches:
    speculative --(rolling metric crosses the rule's threshold over a full window)--> rolled_back
    rolled_back --(probation_s elapsed)--> probing
    probing     --(probe_window probe samples, metric healthy)--> speculative
    probing     --(probe_window probe samples, metric unhealthy)--> rolled_back (another probation period)

While rolled back no request of the class speculates; while probing, `probe_fraction` of the requests that would
speculate do (spread evenly: the first request after probation starts is a probe, then one in every
1/probe_fraction). Only samples of the current state count: every switch starts a new epoch, and rounds or
finishes of requests admitted in an earlier epoch are ignored. Every switch is logged and kept as a SwitchEvent.

Across replicas: the state lives in the store's RollbackStates (store.py; Redis for a shared store). Each replica
decides from its own samples and applies a switch by compare-and-set on the epoch, so a switch is made (and
recorded, and logged) once, and every replica adopts the stored state within `sync_s`. While a shared store is
unreachable a replica keeps the last state it saw and its switches wait for the store.
"""
from __future__ import annotations

from collections import deque

from dspark_jax.governance.metrics import percentile
from dspark_jax.governance.policy import RollbackRule
from dspark_jax.governance.store import (PROBING, ROLLED_BACK, SPECULATIVE, ClassState, RollbackStates,
                                         StoreUnavailable, SwitchEvent, logger)

__all__ = ["PROBING", "ROLLED_BACK", "SPECULATIVE", "RollbackController", "SwitchEvent"]


class _Window:
    """The last `size` samples of a metric: acceptance (sum accepted / sum verified) or p95 latency."""

    def __init__(self, metric: str, size: int):
        self.metric, self.size = metric, size
        self._samples: deque = deque(maxlen=size)
        self._verified = self._accepted = 0

    def add(self, sample: float | tuple[int, int]) -> None:
        if self.metric == "acceptance":
            if len(self._samples) == self.size:
                old_v, old_a = self._samples[0]
                self._verified -= old_v
                self._accepted -= old_a
            self._verified += sample[0]
            self._accepted += sample[1]
        self._samples.append(sample)

    @property
    def full(self) -> bool:
        return len(self._samples) == self.size

    def __len__(self) -> int:
        return len(self._samples)

    def value(self) -> float | None:
        if not self._samples:
            return None
        if self.metric == "acceptance":
            return self._accepted / self._verified
        return percentile(self._samples, 95)


class RollbackController:
    """The speculation state of one class under its RollbackRule. Not thread-safe: the Governor locks."""

    def __init__(self, workload_class: str, rule: RollbackRule, states: RollbackStates, sync_s: float = 0.0):
        self.workload_class, self.rule, self._states, self.sync_s = workload_class, rule, states, sync_s
        self.view = ClassState()
        self._synced_at: float | None = None
        self._window = _Window(rule.metric, rule.window)
        self._probes = _Window(rule.metric, rule.probe_window)
        self._probe_credit = 0.0

    @property
    def state(self) -> str:
        return self.view.state

    @property
    def epoch(self) -> int:
        return self.view.epoch

    # -- admission ---------------------------------------------------------------------------------------------
    def admit(self, now: float) -> tuple[bool, bool, int]:
        """For a request that would speculate: (may speculate, is a probe, epoch to tag the request with)."""
        self.refresh(now)
        if self.state == SPECULATIVE:
            return True, False, self.epoch
        if self.state == ROLLED_BACK:
            return False, False, self.epoch
        self._probe_credit += self.rule.probe_fraction
        if self._probe_credit >= 1.0 - 1e-9:
            self._probe_credit -= 1.0
            return True, True, self.epoch
        return False, False, self.epoch

    def refresh(self, now: float) -> None:
        """Adopts the stored state (at most every sync_s), and starts probing once the probation period is over."""
        if self._synced_at is None or now - self._synced_at >= self.sync_s or now < self._synced_at:
            try:
                self._adopt(self._states.load(self.workload_class))
                self._synced_at = now
            except StoreUnavailable:
                pass  # keep the last state seen; counted by the store's health
        if self.state == ROLLED_BACK and now >= self.view.probation_until:
            self._switch(PROBING, self.view.probation_until,
                         f"probation of {self.rule.probation_s:g} s over; speculating on "
                         f"{self.rule.probe_fraction:.0%} of requests as probes", None)

    def _adopt(self, view: ClassState) -> None:
        """A new epoch (ours or another replica's): fresh windows; probing starts with a probe."""
        if view.epoch != self.view.epoch:
            self._window = _Window(self.rule.metric, self.rule.window)
            self._probes = _Window(self.rule.metric, self.rule.probe_window)
            self._probe_credit = 1.0 - self.rule.probe_fraction
        self.view = view

    # -- samples -----------------------------------------------------------------------------------------------
    def record_round(self, epoch: int, probe: bool, verified_draft: int, accepted: int, now: float) -> None:
        """A drafted verification round of a request admitted in `epoch`."""
        if self.rule.metric == "acceptance" and verified_draft > 0:
            self._sample(epoch, probe, (verified_draft, accepted), now)

    def record_request(self, epoch: int, probe: bool, latency_s: float, now: float) -> None:
        """A finished speculating request admitted in `epoch`."""
        if self.rule.metric == "p95_latency_s":
            self._sample(epoch, probe, latency_s, now)

    def _sample(self, epoch: int, probe: bool, sample, now: float) -> None:
        self.refresh(now)
        if epoch != self.epoch:
            return
        if self.state == SPECULATIVE and not probe:
            self._window.add(sample)
            value = self._window.value()
            if self._window.full and not self.rule.is_healthy(value):
                self._switch(ROLLED_BACK, now, f"{self._describe(value, self.rule.window)} "
                                               f"{self._comparison(value)} threshold {self.rule.threshold:g}",
                             value)
        elif self.state == PROBING and probe:
            self._probes.add(sample)
            if self._probes.full:
                value = self._probes.value()
                what = f"probe {self._describe(value, self.rule.probe_window)}"
                if self.rule.is_healthy(value):
                    self._switch(SPECULATIVE, now, f"{what} healthy ({self._comparison(value)} threshold "
                                                   f"{self.rule.threshold:g}); speculation restored", value)
                else:
                    self._switch(ROLLED_BACK, now, f"{what} still {self._comparison(value)} threshold "
                                                   f"{self.rule.threshold:g}; another probation period", value)

    # -- helpers -----------------------------------------------------------------------------------------------
    def _describe(self, value: float, n: int) -> str:
        if self.rule.metric == "acceptance":
            return f"rolling acceptance {value:.3f} over the last {n} drafted rounds"
        return f"rolling p95 latency {value:.3f} s over the last {n} speculating requests"

    def _comparison(self, value: float) -> str:
        if self.rule.metric == "acceptance":
            return "at or above" if value >= self.rule.threshold else "below"
        return "at or below" if value <= self.rule.threshold else "above"

    def _switch(self, to_state: str, now: float, reason: str, value: float | None) -> None:
        """Proposes the switch to the store: applied and logged if no replica switched the class first (then its
        state is adopted instead). While the store is unreachable nothing changes: the next sample retries."""
        event = SwitchEvent(time=now, workload_class=self.workload_class, from_state=self.state, to_state=to_state,
                            reason=reason, metric=self.rule.metric, value=value, threshold=self.rule.threshold)
        new = ClassState(to_state, self.epoch + 1, now,
                         now + self.rule.probation_s if to_state == ROLLED_BACK else None)
        try:
            applied, current = self._states.switch(self.epoch, new, event)
        except StoreUnavailable:
            return
        self._adopt(current)
        if applied:
            log = logger.warning if to_state == ROLLED_BACK else logger.info
            log("workload class %r: %s -> %s: %s", self.workload_class, event.from_state, to_state, reason)

    def status(self, now: float) -> dict:
        """JSON-ready state: current state, rule, rolling values and window fill."""
        self.refresh(now)
        return dict(state=self.state, since=self.view.since, epoch=self.epoch, metric=self.rule.metric,
                    threshold=self.rule.threshold, window=self.rule.window, rolling_value=self._window.value(),
                    window_samples=len(self._window), probe_fraction=self.rule.probe_fraction,
                    probe_window=self.rule.probe_window, probe_value=self._probes.value(),
                    probe_samples=len(self._probes), probation_until=self.view.probation_until)

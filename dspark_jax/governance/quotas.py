"""Per-tenant token quotas over fixed time windows, reserved at admission and reconciled at finish.

Windows are fixed and aligned to multiples of `window_s` on the governor's clock (with the default clock,
`time.time`, hourly windows start on the hour UTC). A tenant's usage in the current window is

    used = tokens charged by requests that finished in this window + reservations of requests still in flight

An admission reserves `prompt_tokens + max_new_tokens` (count: total) or `max_new_tokens` (count: output) and is
refused if that would push `used` above the quota. At finish the reservation is dropped and the actual tokens
are charged to the window current at finish time. In-flight reservations count against every window they are
alive in, so as long as a request produces no more than it reserved, no window is ever charged more than its
quota, however many requests run concurrently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from dspark_jax.governance.policy import QuotaRule


class QuotaExceeded(Exception):
    """A reservation that would exceed a tenant's quota; `str()` explains which and by how much;
    `retry_after_s`: seconds until the window that refused it resets."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def quota_exceeded(tenant: str, rule: QuotaRule, charged: int, reserved: int, need: int,
                   resets_in_s: float) -> QuotaExceeded:
    """The refusal of a reservation of `need` tokens, explained."""
    counted = "prompt + output" if rule.count == "total" else "output"
    return QuotaExceeded(
        f"tenant {tenant!r} quota of {rule.tokens} tokens ({counted}) per {rule.window_s:g} s would be exceeded: "
        f"{charged} used and {reserved} reserved by in-flight requests in this window, this request needs up to "
        f"{need}; the window resets in {resets_in_s:.0f} s", resets_in_s)


@dataclass
class _WindowUsage:
    rule: QuotaRule
    window_start: float = -math.inf
    charged: int = 0
    reserved: int = 0
    overshoot: int = 0  # all-time tokens charged beyond what was reserved (requests that produced more)

    def roll(self, now: float) -> None:
        start = math.floor(now / self.rule.window_s) * self.rule.window_s
        if start > self.window_start:
            self.window_start, self.charged = start, 0

    def amount(self, prompt_tokens: int, output_tokens: int) -> int:
        return output_tokens + (prompt_tokens if self.rule.count == "total" else 0)


@dataclass
class _Reservation:
    tenant: str
    amounts: list[int] = field(default_factory=list)  # one per quota rule of the tenant


class QuotaLedger:
    """Token usage and in-flight reservations of every tenant with quotas (tenants without quotas are unlimited)."""

    def __init__(self, quotas: Mapping[str, Sequence[QuotaRule]]):
        self._usage = {tenant: [_WindowUsage(rule) for rule in rules] for tenant, rules in quotas.items()}
        self._reservations: dict[str, _Reservation] = {}

    def reserve(self, request_id: str, tenant: str, prompt_tokens: int, max_new_tokens: int, now: float) -> None:
        """Reserves the request's worst case under every quota of `tenant`, or raises QuotaExceeded (nothing
        reserved then)."""
        if request_id in self._reservations:
            raise ValueError(f"request {request_id!r} already holds a quota reservation")
        windows = self._usage.get(tenant)
        if not windows:
            return  # no quota: nothing to reserve
        amounts = []
        for w in windows:
            w.roll(now)
            need = w.amount(prompt_tokens, max_new_tokens)
            if w.charged + w.reserved + need > w.rule.tokens:
                raise quota_exceeded(tenant, w.rule, w.charged, w.reserved, need,
                                     w.window_start + w.rule.window_s - now)
            amounts.append(need)
        for w, need in zip(windows, amounts):
            w.reserved += need
        self._reservations[request_id] = _Reservation(tenant, amounts)

    def admit_unreserved(self, request_id: str, tenant: str) -> None:
        """Tracks a request admitted without a reservation (the store was down under `on_error: allow`): its
        tokens are still charged at `reconcile`, and count as overshoot."""
        windows = self._usage.get(tenant)
        if windows:
            self._reservations[request_id] = _Reservation(tenant, [0] * len(windows))

    def reconcile(self, request_id: str, prompt_tokens: int, output_tokens: int, now: float) -> None:
        """Replaces the request's reservation by its actual tokens, charged to the current window."""
        reservation = self._reservations.pop(request_id, None)
        if reservation is None:
            return  # no reservation: the tenant has no quota, or the request was never admitted
        for w, reserved in zip(self._usage[reservation.tenant], reservation.amounts):
            w.reserved -= reserved
            w.roll(now)
            actual = w.amount(prompt_tokens, output_tokens)
            w.charged += actual
            w.overshoot += max(0, actual - reserved)

    def snapshot(self, now: float) -> dict[str, list[dict]]:
        """Per tenant, per quota: limit, window, what is counted, used / reserved / remaining tokens."""
        out = {}
        for tenant, windows in self._usage.items():
            rows = []
            for w in windows:
                w.roll(now)
                rows.append(dict(tokens=w.rule.tokens, window_s=w.rule.window_s, count=w.rule.count,
                                 window_start=w.window_start, used=w.charged, reserved=w.reserved,
                                 remaining=max(0, w.rule.tokens - w.charged - w.reserved),
                                 overshoot_total=w.overshoot))
            out[tenant] = rows
        return out

"""Serving cost from busy wall time, and its split over requests.

Formulas (cost_per_hour_usd is the policy's all-in cost of the serving pool):
    cost_usd                        = cost_per_hour_usd * busy_seconds / 3600
    cost per million output tokens  = cost_usd / output_tokens * 1e6   (output tokens = tokens returned to users)
    cost per successful request     = cost_usd / successful_requests

busy_seconds is wall time during which at least one request was running (idle time is not charged). A group's
(class, tenant) share is processor sharing: every stretch of wall time is split equally among the requests
running in it, so the shares of all groups add up to the pool's busy seconds exactly.
"""
from __future__ import annotations

from collections import Counter
from typing import Hashable


def serving_cost_usd(cost_per_hour_usd: float, busy_seconds: float) -> float:
    return cost_per_hour_usd * busy_seconds / 3600.0


def cost_per_million_tokens(cost_usd: float, tokens: int) -> float | None:
    """None when no tokens were produced (the ratio is undefined)."""
    return cost_usd / tokens * 1e6 if tokens > 0 else None


def cost_per_request(cost_usd: float, requests: int) -> float | None:
    return cost_usd / requests if requests > 0 else None


class BusyTimeAccountant:
    """Busy wall time of the pool and each group's equal share of it, from request start / stop events."""

    def __init__(self):
        self.busy_seconds = 0.0
        self.by_group: Counter[Hashable] = Counter()
        self._running: dict[Hashable, Hashable] = {}  # request id -> group
        self._running_per_group: Counter[Hashable] = Counter()
        self._last: float | None = None

    def advance(self, now: float) -> None:
        """Accrues the time since the last event to the running requests (a clock going back accrues nothing)."""
        if self._last is not None and now > self._last and self._running:
            dt = now - self._last
            self.busy_seconds += dt
            n = len(self._running)
            for group, k in self._running_per_group.items():
                self.by_group[group] += dt * k / n
        if self._last is None or now > self._last:
            self._last = now

    def start(self, request_id: Hashable, group: Hashable, now: float) -> None:
        if request_id in self._running:
            return
        self.advance(now)
        self._running[request_id] = group
        self._running_per_group[group] += 1

    def stop(self, request_id: Hashable, now: float) -> None:
        if request_id not in self._running:
            return
        self.advance(now)
        group = self._running.pop(request_id)
        self._running_per_group[group] -= 1
        if not self._running_per_group[group]:
            del self._running_per_group[group]

    def is_running(self, request_id: Hashable) -> bool:
        return request_id in self._running

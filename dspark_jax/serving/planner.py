"""The engine's per-step draft plan: pure NumPy over the slot arrays, no device, no model (unit-tested alone).

Given each slot's request (None = idle) and the confidences of the pending proposals, the planner decides how
many drafts each slot may verify (caps from the request's own draft mode, cut at its confidence floor), the
verification budget (Σ lengths for the synchronous policies; Algorithm 1 for hardware-aware requests) and the
step kind: "draft" (verify + draft), "plain" (the target alone: the scheduler's plain fallback) or "probe" (one
draft step after draft-free ones, refreshing the confidences the fallback decision rests on; the probe interval
doubles, up to 8×, while probes keep finding drafting not worth it).
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from dspark_jax.serving.cost_table import CostTable
from dspark_jax.serving.requests import Request
from dspark_jax.serving.scheduler import drafting_pays, schedule_synchronous, threshold_lengths

POLICIES = ("plain", "fixed", "threshold", "scheduler", "scheduler_async")
ADAPTIVE_MODES = ("default", "hardware_aware")  # request modes that follow the engine's scheduler


class Planner:
    """policy: one of POLICIES; gamma: the engine's draft length; block: the drafter's block size G;
    threshold: the threshold policy's confidence floor; has_plain_step: the engine compiled a draft-free step
    (scheduler policies with plain fallback)."""

    def __init__(self, slots: int, policy: str, gamma: int, block: int, threshold: float, probe_every: int,
                 cost_table: CostTable | None, has_plain_step: bool):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.slots, self.policy, self.gamma, self.block = slots, policy, gamma, block
        self.threshold, self.probe_every, self.cost_table = threshold, probe_every, cost_table
        self.has_plain_step = has_plain_step
        self.fresh = np.zeros(slots, bool)  # slot's pending proposal was drafted at its current anchor
        self.plain_run = 0  # draft-free steps since the last draft step
        self.probe_interval = probe_every  # doubles after each probe that finds drafting not paying
        self.last_kind = "draft"
        self.history: collections.deque[np.ndarray] = collections.deque(maxlen=2)  # confidences of the last steps

    # ---- per-slot views ----------------------------------------------------------------------------
    @staticmethod
    def active(requests: Sequence[Request | None]) -> np.ndarray:
        """Slots holding a request."""
        return np.array([r is not None for r in requests])

    @staticmethod
    def adaptive(requests: Sequence[Request | None]) -> np.ndarray:
        """Slots whose request follows the engine's scheduler (draft_mode default or hardware_aware)."""
        return np.array([r is not None and r.draft_mode in ADAPTIVE_MODES for r in requests])

    def floors(self, requests: Sequence[Request | None]) -> np.ndarray:
        """Per-slot confidence floors: a static_threshold request's own floor (the engine threshold if it gives
        none); under the threshold policy, the larger of the request floor and the threshold."""
        floors = np.zeros(self.slots, np.float32)
        for i, r in enumerate(requests):
            if r is None:
                continue
            if r.draft_mode == "static_threshold":
                floors[i] = r.confidence_floor or self.threshold
            elif r.draft_mode == "default" and self.policy == "threshold":
                floors[i] = max(r.confidence_floor, self.threshold)
            else:
                floors[i] = r.confidence_floor
        return floors

    def caps(self, requests: Sequence[Request | None], confidence: np.ndarray | None) -> np.ndarray:
        """Per-slot maximum drafts from each request's own policy (0 for idle slots), cut at its floor when
        confidences are known (the device cuts there too; the host scheduler must know it)."""
        caps = np.zeros(self.slots, np.int64)
        floors = self.floors(requests)
        for i, r in enumerate(requests):
            if r is None:
                continue
            cap = self.gamma if r.max_draft is None else min(r.max_draft, self.block)
            if r.draft_mode == "off" or self.policy == "plain":
                cap = 0
            if floors[i] > 0 and confidence is not None:
                cap = min(cap, int(threshold_lengths(confidence[i:i + 1], floors[i])[0]))
            caps[i] = cap
        return caps

    # ---- decisions ---------------------------------------------------------------------------------
    def kind(self, requests: Sequence[Request | None], confidence: np.ndarray | None, lengths: np.ndarray,
             adaptive: np.ndarray) -> str:
        """Plain fallback: "plain" when every drafting request is hardware-aware and a draft step is not
        expected to pay (or drafting is already off and no probe is due), "probe" when one is due, else "draft"."""
        act = self.active(requests)
        if not self.has_plain_step or (act & ~adaptive & (lengths > 0)).any():
            return "draft"
        if (act & ~self.fresh).any():  # drafting is off: proposals are stale
            return "plain" if self.plain_run < self.probe_interval else "probe"
        if confidence is None:
            return "draft"
        pays = drafting_pays(confidence[act], lengths[act], self.cost_table)
        if self.last_kind == "probe":  # back off while probes keep finding drafting not worth it
            every = self.probe_every
            self.probe_interval = every if pays else min(2 * self.probe_interval, 8 * every)
        return "draft" if pays else "plain"

    def sync_plan(self, requests: Sequence[Request | None], confidence: np.ndarray) -> tuple[np.ndarray, int, str]:
        """Exact lengths per slot for the synchronous policies (budget = Σ lengths) and the step kind, from the
        fresh confidences [S, G] of the pending proposals."""
        caps = self.caps(requests, confidence)
        caps[~self.fresh] = 0  # proposals drafted before draft-free steps are not verified
        ha = self.adaptive(requests)
        if self.policy == "scheduler" and ha.any():
            static_tokens = int(caps[~ha & self.active(requests)].sum())
            caps[ha] = schedule_synchronous(confidence[ha], self.cost_table, caps[ha], base_tokens=static_tokens)
        kind = self.kind(requests, confidence, caps, ha) if self.policy == "scheduler" else "draft"
        return caps, int(caps.sum()), kind

    def async_plan(self, requests: Sequence[Request | None], probe_read: bool) -> tuple[np.ndarray, int, str]:
        """scheduler_async: caps, the budget from the global search over the confidences we hold (two steps
        old; a probe's own when it was just read) and the step kind."""
        act = self.active(requests)
        caps = self.caps(requests, None)
        caps[~self.fresh] = 0
        if probe_read:  # the probe's own proposals, drafted at the current anchors
            conf = self.history[-1]
        else:
            conf = self.history[0] if len(self.history) == 2 else None
        if conf is None:
            lengths = caps
        else:
            lengths = np.zeros_like(caps)
            lengths[act] = schedule_synchronous(conf[act], self.cost_table, caps[act], early_stop=False)
        return caps, int(lengths.sum()), self.kind(requests, conf, lengths, self.adaptive(requests))

    # ---- bookkeeping -------------------------------------------------------------------------------
    def dispatched(self, kind: str) -> None:
        """A step of `kind` was dispatched: draft-free steps leave every proposal stale."""
        self.last_kind = kind
        if kind == "plain":
            self.plain_run += 1
            self.fresh[:] = False
        else:
            self.plain_run = 0
            self.fresh[:] = True

    def admitted(self, slot: int) -> None:
        """Admission drafts the slot's first proposal at its anchor."""
        self.fresh[slot] = True

    def observed(self, confidence: np.ndarray) -> None:
        """The confidences [S, G] of the proposals a step drafted."""
        self.history.append(np.asarray(confidence))

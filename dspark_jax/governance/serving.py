"""A governed serving engine: every request passes the Governor's admission, runs on the Engine with the
speculation settings of its workload class, and reports its rounds and its end back to the Governor.

    governed = GovernedEngine(engine, Governor.from_policy_file("configs/policies/default.yaml"))
    rid = governed.submit("research", prompt_text="Write a python function ...", max_new_tokens=64)
    tokens = governed.result(rid)              # submit raised RequestRejected if the policy refused it
    governed.write_snapshot("snapshot.json")

Several GovernedEngines (e.g. the two arms of an A/B test, each with its own Governor) may share one Engine:
they share its observer, a GovernorRelay that routes every engine event to the governor of its request.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from dspark_jax.governance.governor import Admission, GovernedRequest, Governor
from dspark_jax.serving.engine import Engine
from dspark_jax.serving.requests import Request, RequestStats

OK_REASONS = ("stop", "length")  # engine finish reasons of a successful request


def engine_request(admission: Admission, prompt_ids: Sequence[int], seed: int | None = None) -> Request:
    """The engine Request that carries out an Admission: speculation off -> draft_mode 'off'; otherwise the
    class's scheduler mode, max_draft and confidence floor (mode 'fixed' ignores confidence, as the policy
    defines it), and the admitted sampling settings."""
    if not admission.speculate or admission.scheduler_mode == "off" or admission.max_draft == 0:
        mode, max_draft, floor = "off", 0, 0.0
    else:
        mode, max_draft = admission.scheduler_mode, admission.max_draft
        floor = 0.0 if mode == "fixed" else admission.confidence_floor
    return Request(prompt_ids=list(prompt_ids), max_new_tokens=admission.max_new_tokens,
                   temperature=admission.temperature, top_k=admission.top_k, top_p=admission.top_p,
                   draft_mode=mode, max_draft=max_draft, confidence_floor=floor, seed=seed)


class GovernorRelay:
    """The engine observer: relays on_start / on_round / on_finish of each engine request to the governor that
    admitted it (record_start / record_round / record_finish, with ok=False unless the request stopped or hit
    its length). A background engine loop can report a request before its submitter learns the engine id and
    registers it: while a governed submission is in progress, events of unknown requests are held and replayed
    at registration; the others (requests submitted to the engine directly, not governed) are dropped."""

    def __init__(self):
        self._lock = threading.Lock()  # never held while calling into the engine
        self._routes: dict[int, tuple[Governor, str]] = {}
        self._held: dict[int, list[tuple[str, tuple]]] = {}
        self._submitting = 0

    @classmethod
    def attach(cls, engine: Engine) -> "GovernorRelay":
        """The engine's relay, installed as its observer if it has none yet."""
        if engine.observer is None:
            engine.observer = cls()
        elif not isinstance(engine.observer, GovernorRelay):
            raise ValueError(f"the engine already has an observer ({type(engine.observer).__name__}); a governed "
                             f"engine needs its own")
        return engine.observer

    @contextlib.contextmanager
    def submitting(self) -> Iterator[None]:
        """Wraps an engine submission and its `register`: events of unknown requests are held meanwhile."""
        with self._lock:
            self._submitting += 1
        try:
            yield
        finally:
            with self._lock:
                self._submitting -= 1
                if not self._submitting:
                    self._held.clear()

    def register(self, rid: int, governor: Governor, request_id: str) -> None:
        """Routes engine request `rid` to `governor` as `request_id` and replays its held events."""
        with self._lock:
            self._routes[rid] = (governor, request_id)
            for name, args in self._held.pop(rid, []):
                self._relay(name, rid, args)

    # -- the Engine observer interface ----------------------------------------------------------------------
    def on_start(self, rid: int) -> None:
        self._event("start", rid, ())

    def on_round(self, rid: int, verified: int, accepted: int, committed: int, drafted: bool) -> None:
        self._event("round", rid, (verified, accepted, committed, drafted))

    def on_finish(self, rid: int, stats: RequestStats) -> None:
        self._event("finish", rid, (stats,))

    def _event(self, name: str, rid: int, args: tuple) -> None:
        with self._lock:
            if rid in self._routes:
                self._relay(name, rid, args)
            elif self._submitting:
                self._held.setdefault(rid, []).append((name, args))

    def _relay(self, name: str, rid: int, args: tuple) -> None:
        governor, request_id = self._routes[rid]
        if name == "start":
            governor.record_start(request_id)
        elif name == "round":
            verified, accepted, committed, drafted = args
            governor.record_round(request_id, verified_draft=verified, accepted=accepted, committed=committed,
                                  drafted=drafted)
        else:
            (stats,) = args
            del self._routes[rid]
            first = None if stats.first_token_at is None else max(0.0, stats.first_token_at - stats.submitted_at)
            governor.record_finish(request_id, prompt_tokens=stats.prompt_tokens, output_tokens=stats.output_tokens,
                                   latency_s=max(0.0, stats.latency_s or 0.0), first_token_s=first,
                                   ok=stats.finish_reason in OK_REASONS)


class GovernedEngine:
    """An Engine behind a Governor. `submit` admits (or raises RequestRejected, queueing nothing) and returns the
    engine's request id; stream / result / tokens / stats / cancel take that id, as on the Engine."""

    def __init__(self, engine: Engine, governor: Governor):
        self.engine, self.governor = engine, governor
        self._relay = GovernorRelay.attach(engine)
        self._admissions: dict[int, Admission] = {}

    def submit(self, tenant: str, prompt_text: str | None = None, prompt_ids: Sequence[int] | None = None, *,
               workload_class: str | None = None, max_new_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               overrides: Mapping[str, Any] | None = None, seed: int | None = None) -> int:
        """Admits the request under the policy and queues it with its class's settings. Give `prompt_text`
        (tokenized with the target's tokenizer, BOS first) or `prompt_ids`; `workload_class=None` lets the
        classifier choose from the text. Raises RequestRejected (reason, code) or the engine's RequestError."""
        if (prompt_text is None) == (prompt_ids is None):
            raise ValueError("give exactly one of prompt_text and prompt_ids")
        if prompt_ids is None:
            prompt_ids = self.engine.target.tokenizer.encode(prompt_text, add_bos=True)
        elif workload_class is None:
            prompt_text = _decode(self.engine, prompt_ids)
        admission = self.governor.admit(GovernedRequest(
            tenant=tenant, prompt_tokens=len(prompt_ids), prompt_text=prompt_text or "",
            workload_class=workload_class, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, overrides=dict(overrides or {})))
        request = engine_request(admission, prompt_ids, seed)
        with self._relay.submitting():
            try:
                rid = self.engine.submit(request)
            except Exception:
                # admitted but not servable (e.g. longer than the engine's max_len): a failed request, quota released
                self.governor.record_finish(admission.request_id, prompt_tokens=len(prompt_ids), output_tokens=0,
                                            latency_s=0.0, ok=False)
                raise
            self._admissions[rid] = admission
            self._relay.register(rid, self.governor, admission.request_id)
        return rid

    def admission(self, rid: int) -> Admission:
        """The settings request `rid` was admitted with (class, speculation, sampling, governor request id)."""
        try:
            return self._admissions[rid]
        except KeyError:
            raise KeyError(f"unknown governed request id {rid}") from None

    # -- the Engine's request API ---------------------------------------------------------------------------
    def stream(self, rid: int) -> Iterator[int]:
        return self.engine.stream(rid)

    def result(self, rid: int, timeout: float | None = None) -> list[int]:
        return self.engine.result(rid, timeout)

    def tokens(self, rid: int) -> list[int]:
        return self.engine.tokens(rid)

    def stats(self, rid: int) -> RequestStats:
        return self.engine.stats(rid)

    def cancel(self, rid: int) -> None:
        self.engine.cancel(rid)

    def start(self) -> None:
        self.engine.start()

    def shutdown(self) -> None:
        """Stops the engine, then releases the governor's store (settles what finished)."""
        self.engine.shutdown()
        self.governor.close()

    def run_until_idle(self) -> None:
        self.engine.run_until_idle()

    # -- metrics --------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return self.governor.snapshot()

    def write_snapshot(self, path: str | Path) -> Path:
        """The governor's snapshot as JSON, written atomically (for `dspark report --snapshot`)."""
        return self.governor.write_snapshot(path)


def _decode(engine: Engine, prompt_ids: Sequence[int]) -> str:
    """The prompt's text for the classifier ('' when the tokenizer cannot decode)."""
    decode = getattr(engine.target.tokenizer, "decode", None)
    try:
        return decode(list(prompt_ids)) if decode is not None else ""
    except Exception:  # noqa: BLE001 -- classification then falls back to the tenant's default class
        return ""

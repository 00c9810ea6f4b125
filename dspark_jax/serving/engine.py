"""Continuous-batching speculative decoding engine: request slots, per-request sampling / budgets / stop
tokens / draft policy, a bucketed verification step chosen per step by the scheduling policy, streaming,
cancellation, per-request stats. Every device shape compiles once, at engine start.

    engine = Engine(target, drafter, EngineConfig(slots=8, policy="scheduler"), cost_table=table)
    handle = engine.submit(Request(prompt_ids, max_new_tokens=64))
    for token in engine.stream(handle): ...          # drives the engine from this thread
    engine.run_until_idle(); engine.stats(handle)

Or `engine.start()` runs the loop in a background thread and `stream` / `result` just wait.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.decoding.speculative import draft_head
from dspark_jax.sampling import SamplingParams
from dspark_jax.sampling.keys import request_key_data, request_keys
from dspark_jax.serving import device_step
from dspark_jax.serving.cost_table import CostTable
from dspark_jax.serving.engine_config import EngineConfig, default_buckets, prompt_buckets
from dspark_jax.serving.planner import Planner
from dspark_jax.serving.requests import Request, RequestStats, first_stop, validate_request
from dspark_jax.utils.machine import describe_machine


@dataclasses.dataclass
class LiveRequest:
    rid: int
    request: Request
    stats: RequestStats
    tokens: list[int] = dataclasses.field(default_factory=list)
    out: "queue.Queue[int | None]" = dataclasses.field(default_factory=queue.Queue)
    slot: int | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancel_requested: bool = False


class Engine:
    def __init__(self, target, drafter, config: EngineConfig = EngineConfig(), cost_table: CostTable | None = None,
                 observer=None):
        """drafter: a `dspark_jax.drafters.factory.Drafter`. observer: optional object with
        on_start(rid) / on_round(rid, verified, accepted, committed, drafted) / on_finish(rid, stats)."""
        target, drafter = target.with_attn_impl(config.attn_impl), drafter.with_attn_impl(config.attn_impl)
        self.target, self.drafter, self.config = target, drafter, config
        g = drafter.config.block_size
        self.gamma = g if config.gamma is None else min(config.gamma, g)
        self.block = g
        self.buckets = tuple(config.buckets or default_buckets(config.slots, g))
        if self.buckets[-1] > config.slots * (g + 1) or self.buckets[0] < 1:
            raise ValueError(f"buckets must lie in 1..slots·(G+1) = {config.slots * (g + 1)}, got {self.buckets}")
        if self.buckets[-1] < config.slots:
            raise ValueError(f"the largest bucket must hold one token per slot ({config.slots})")
        self.cost_table = cost_table
        self.observer = observer
        self.stop_ids = tuple(target.stop_ids)
        self._stops = jnp.asarray(self.stop_ids or (-1,), jnp.int32)
        self._ids = itertools.count()
        self._queue: collections.deque[LiveRequest] = collections.deque()
        self._requests: dict[int, LiveRequest] = {}
        self._slots: list[LiveRequest | None] = [None] * config.slots
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop_thread = threading.Event()
        self._pending = None  # async policy: (StepOutput future, owners, step kind)
        self.steps = 0
        self.plain_steps = 0  # of `steps`, those that ran without the drafter (plain fallback)
        self.bucket_counts: collections.Counter[int] = collections.Counter()
        self.kv_counts: collections.Counter[int] = collections.Counter()  # steps per cache length attended
        self.kv_buckets = config.cache_lengths
        fewest_rows = 1 + 2 * (g + 1)  # a 1-token prompt's first step (see _kv_bucket)
        if len(self.kv_buckets) > 1 and self.kv_buckets[0] < fewest_rows:
            raise ValueError(f"kv_buckets {self.kv_buckets}: cache lengths below {fewest_rows} rows (a 1-token prompt "
                             f"plus two steps of G + 1 = {g + 1}) would never be used")
        self._state = device_step.init_engine_state(target.model, nnx.merge(drafter.graphdef, drafter.state),
                                                    config.slots, config.max_len)
        self._compile()
        self.planner = Planner(config.slots, config.policy, self.gamma, g, config.threshold, config.probe_every,
                               cost_table, has_plain_step=self._plain_exec is not None)
        if config.policy.startswith("scheduler") and cost_table is None:
            # the scheduler needs SPS(B) of this machine
            self.cost_table = self.profile(config.profile_steps, passes=config.profile_passes)
            self.planner.cost_table = self.cost_table

    def set_cost_table(self, table: CostTable) -> None:
        """Prices steps with `table` from now on (e.g. a profile taken by another engine of the same shapes).
        Raises ValueError unless it covers this engine's buckets."""
        if tuple(table.buckets) != tuple(self.buckets):
            raise ValueError(f"cost table buckets {tuple(table.buckets)} differ from the engine's {self.buckets}")
        self.cost_table = self.planner.cost_table = table

    def profile(self, steps: int = 3, prompt_len: int = 16, passes: int = 3) -> CostTable:
        """Measures steps/s of the real draft+verify step at every bucket on this machine, and of the draft-free
        step when the engine has one (scheduler policies with plain_fallback): the median over every step timed by
        `profile_timings` (interleaved passes). The engine must be idle; its state is reset afterwards."""
        timings = self.profile_timings(steps, prompt_len, passes)
        plain = timings.pop("plain", None)
        sps = tuple(1.0 / float(np.median(timings[b])) for b in self.buckets)
        return CostTable(self.buckets, sps, machine=describe_machine(),
                         plain_steps_per_s=None if plain is None else 1.0 / float(np.median(plain)))

    def profile_timings(self, steps: int = 3, prompt_len: int = 16, passes: int = 3) -> dict:
        """Seconds of each timed step: {bucket: [...], "plain": [...]} ("plain" only with a draft-free step).
        Every slot busy with a `prompt_len`-token prompt, each draft step verifying exactly `bucket` tokens, at the
        shortest cache length that holds the profile's steps (`kv_buckets`: the one most requests run at). One
        untimed warm-up step per executable, then `passes` passes, each timing the draft-free step, every bucket
        and the draft-free step again, `steps` steps each from freshly admitted slots — interleaved, so a slower
        minute of a noisy machine spreads over every bucket instead of landing on one (before session 25: 5 steps
        per bucket, bucket after bucket, the draft-free step last; a 4-slot profile once timed the hybrid's draft
        step faster than the draft-free one, BENCHMARKS.md "Session 24"). Raises RuntimeError unless the engine
        is idle, ValueError when max_len cannot hold `steps` steps after the prompt or steps / passes < 1."""
        if not self.idle:
            raise RuntimeError("profile an idle engine")
        if steps < 1 or passes < 1:
            raise ValueError(f"need steps >= 1 and passes >= 1, got steps={steps}, passes={passes}")
        s, cfg = self.config.slots, self.config
        budget = cfg.max_len - prompt_len - self.block - 1
        if budget < (steps + 1) * (self.block + 1):
            raise ValueError(f"max_len {cfg.max_len} is too small to profile {steps} steps")
        width = next(p for p in self._admit_exec if p >= prompt_len)
        kv = self._kv_bucket([prompt_len + (steps + 1) * (self.block + 1)])
        prompts = jnp.asarray(np.full((1, width), 3, np.int32))
        caps = jnp.full((s,), self.block, jnp.int32)

        def timed(bucket: int, executable, count: int) -> list[float]:
            for i in range(s):  # every slot (re)admitted: each run starts from the same cache positions
                self._state, _, _, _ = self._admit_exec[width](
                    **self._dynamic, state=self._state, slots=jnp.asarray([i], jnp.int32), prompts=prompts,
                    prompt_lens=jnp.asarray([prompt_len], jnp.int32), params=SamplingParams.create(1),
                    max_new_tokens=jnp.asarray([budget], jnp.int32), keys=request_keys([[cfg.seed, i]]),
                    stops=jnp.full_like(self._stops, -1))
            jax.block_until_ready(self._state)
            out = []
            for _ in range(count):
                t0 = time.perf_counter()
                self._state, res = executable(**self._dynamic, state=self._state, caps=caps,
                                              floors=jnp.zeros((s,), jnp.float32), draft_budget=jnp.int32(bucket - s),
                                              stops=jnp.full_like(self._stops, -1))
                jax.block_until_ready(res)
                out.append(time.perf_counter() - t0)
            return out

        runs = [(b, b, self._step_exec[b, kv]) for b in self.buckets]
        plain = [("plain", self._plain_bucket, self._plain_exec[kv])] if self._plain_exec is not None else []
        for _, bucket, executable in runs + plain:  # warm-up, untimed
            timed(bucket, executable, 1)
        order = plain + runs + plain
        timings: dict = {key: [] for key, _, _ in order}
        for _ in range(passes):
            for key, bucket, executable in order:
                timings[key] += timed(bucket, executable, steps)
        for i in range(s):
            self._state = self._deactivate(self._state, jnp.int32(i))
        return timings

    # ---- compilation -------------------------------------------------------------------------------
    def _compile(self) -> None:
        t, d = self.target, self.drafter
        common = dict(target_graphdef=t.graphdef, target_state=t.state, drafter_graphdef=d.graphdef,
                      drafter_state=d.state)
        head = draft_head(**common)
        common["head"] = head
        self._dynamic = dict(target_state=t.state, drafter_state=d.state, head=head)  # compiled calls omit static args
        cfg = self.config
        s = cfg.slots
        step_jit = jax.jit(device_step.step, static_argnames=("target_graphdef", "drafter_graphdef", "bucket", "kv_len",
                                                               "draft", "mode"), donate_argnames=("state",))
        draft = cfg.policy != "plain"
        buckets = self.buckets if draft else tuple(b for b in self.buckets if b >= s)[:1]
        self.buckets = buckets
        lowered = {}  # traced one after the other (Python), compiled in parallel (XLA releases the GIL)

        def lower_step(bucket: int, kv: int, with_draft: bool):
            return step_jit.lower(
                **common, state=self._state, caps=jnp.zeros((s,), jnp.int32), floors=jnp.zeros((s,), jnp.float32),
                draft_budget=jnp.int32(0), stops=self._stops, bucket=bucket, draft=with_draft, mode=cfg.mode,
                kv_len=kv)

        for kv in self.kv_buckets:
            for b in buckets:
                lowered["step", b, kv] = lower_step(b, kv, draft)
        self._plain_bucket = next(b for b in buckets if b >= s)
        with_plain = cfg.policy.startswith("scheduler") and cfg.plain_fallback  # the scheduler's draft-free step
        if with_plain:
            for kv in self.kv_buckets:
                lowered["plain", kv] = lower_step(self._plain_bucket, kv, False)
        admit_jit = jax.jit(device_step.admit, static_argnames=("target_graphdef", "drafter_graphdef", "mode"),
                            donate_argnames=("state",))
        for p in prompt_buckets(cfg.max_len):
            lowered["admit", p] = admit_jit.lower(
                **common, state=self._state, slots=jnp.zeros((1,), jnp.int32), prompts=jnp.zeros((1, p), jnp.int32),
                prompt_lens=jnp.ones((1,), jnp.int32), params=SamplingParams.create(1),
                max_new_tokens=jnp.ones((1,), jnp.int32), keys=request_keys([[0, 0]]),
                stops=self._stops, mode=cfg.mode)
        lowered["deactivate"] = jax.jit(device_step.deactivate, donate_argnames=("state",)).lower(
            self._state, jnp.int32(0))
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            compiled = dict(zip(lowered, pool.map(lambda low: low.compile(), lowered.values())))
        self._step_exec = {key[1:]: ex for key, ex in compiled.items() if key[0] == "step"}
        self._plain_exec = ({key[1]: ex for key, ex in compiled.items() if key[0] == "plain"} if with_plain
                            else None)
        self._admit_exec = {key[1]: ex for key, ex in compiled.items() if key[0] == "admit"}
        self._deactivate = compiled["deactivate"]

    @property
    def compiled_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every executable the engine will ever run (built at start; calls never compile): the step at every
        (step bucket, kv length), the draft-free step at every kv length, admission per prompt width."""
        shapes = dict(step=self.buckets, kv=self.kv_buckets, admit=tuple(self._admit_exec))
        if self._plain_exec is not None:
            shapes["plain_step"] = (self._plain_bucket,)
        return shapes

    # ---- public API --------------------------------------------------------------------------------
    def submit(self, request: Request) -> int:
        """Queues a request; returns its id. Raises RequestError for requests the engine cannot serve."""
        validate_request(request, vocab_size=self.target.config.vocab_size, max_len=self.config.max_len,
                         block=self.block, mode=self.config.mode)
        with self._lock:
            rid = next(self._ids)
            live = LiveRequest(rid, request, RequestStats(prompt_tokens=len(request.prompt_ids),
                                                    submitted_at=time.perf_counter()))
            self._requests[rid] = live
            self._queue.append(live)
        return rid

    def cancel(self, rid: int) -> None:
        """Cancels a queued or running request; its slot is freed at the next step boundary."""
        with self._lock:
            live = self._get(rid)
            if live.done.is_set():
                return
            live.cancel_requested = True
            if live.slot is None and live in self._queue:
                self._queue.remove(live)
                self._finish(live, "cancelled")

    def stream(self, rid: int) -> Iterator[int]:
        """Yields the request's tokens as they are committed (drives the engine unless it runs in a thread)."""
        live = self._get(rid)
        while True:
            try:
                tok = live.out.get_nowait()
            except queue.Empty:
                if self._thread is None:
                    if live.done.is_set() and live.out.empty():
                        return
                    self.step()
                    continue
                tok = live.out.get()
            if tok is None:
                return
            yield tok

    def result(self, rid: int, timeout: float | None = None) -> list[int]:
        live = self._get(rid)
        if self._thread is None:
            while not live.done.is_set():
                self.step()
        elif not live.done.wait(timeout):
            raise TimeoutError(f"request {rid} not finished after {timeout} s")
        return list(live.tokens)

    def stats(self, rid: int) -> RequestStats:
        return dataclasses.replace(self._get(rid).stats)

    def tokens(self, rid: int) -> list[int]:
        return list(self._get(rid).tokens)

    @property
    def running(self) -> bool:
        """Whether the loop runs in a background thread (`start`)."""
        return self._thread is not None

    @property
    def alive(self) -> bool:
        """Whether the background loop is running and has not died of an exception."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._queue and all(s is None for s in self._slots) and self._pending is None

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()

    def start(self) -> None:
        """Runs the engine loop in a background thread (stop with `shutdown`)."""
        if self._thread is not None:
            return
        self._stop_thread.clear()

        def loop():
            while not self._stop_thread.is_set():
                if self.idle:
                    time.sleep(0.001)
                    continue
                try:
                    self.step()
                except Exception as e:  # noqa: BLE001 — an engine fault fails every live request, loudly
                    with self._lock:
                        for live in list(self._requests.values()):
                            if not live.done.is_set():
                                self._finish(live, "error")
                    raise e
        self._thread = threading.Thread(target=loop, name="dspark-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        if self._thread is not None:
            self._stop_thread.set()
            self._thread.join()
            self._thread = None

    # ---- one engine step ---------------------------------------------------------------------------
    def step(self) -> None:
        """Frees cancelled slots, admits queued requests into free slots, runs one draft–verify step and
        delivers its tokens."""
        with self._lock:
            self._reap_cancelled()
            self._admit_queued()
            if self.config.policy == "scheduler_async":
                self._step_async()
            elif self.planner.active(self._requests_by_slot()).any():
                conf = np.asarray(jax.device_get(self._state.proposal.confidence))
                caps, budget, kind = self.planner.sync_plan(self._requests_by_slot(), conf)
                out = self._dispatch(caps, budget, kind)
                self._deliver(jax.device_get(out), list(self._slots))

    def _dispatch(self, caps: np.ndarray, budget: int, kind: str = "draft"):
        """Runs one step: "draft" (verify + draft the next proposals), "probe" (a draft step after draft-free
        ones) or "plain" (the target alone: no drafts verified, none proposed)."""
        self.steps += 1
        requests = self._requests_by_slot()
        floors = self.planner.floors(requests)
        self.planner.dispatched(kind)
        kv = self._kv_bucket([len(live.request.prompt_ids) + len(live.tokens) + 2 * (self.block + 1)
                              for live in self._slots if live is not None])
        self.kv_counts[kv] += 1
        if kind == "plain":
            executable, budget = self._plain_exec[kv], 0
            self.plain_steps += 1
        else:
            n_active = int(self.planner.active(requests).sum())
            bucket = next(b for b in self.buckets if b >= min(n_active + budget, self.buckets[-1]))
            self.bucket_counts[bucket] += 1
            executable = self._step_exec[bucket, kv]
        # host values go in as numpy: an eager jnp op here would compile on a request's first step
        self._state, out = executable(**self._dynamic, state=self._state, caps=np.asarray(caps, np.int32),
                                      floors=np.asarray(floors, np.float32), draft_budget=np.int32(budget),
                                      stops=self._stops)
        return out

    def _kv_bucket(self, rows_needed: list[int]) -> int:
        """The shortest compiled cache length holding `rows_needed` rows of every slot. The step writes rows
        start..start+G of a slot whose anchor sits at start = prompt + tokens delivered - 1; callers add 2(G+1)
        to prompt + delivered: this step's rows and, under the async policy, the step still in flight."""
        need = min(max(rows_needed, default=1), self.config.max_len)
        return next(k for k in self.kv_buckets if k >= need)

    def _requests_by_slot(self) -> list[Request | None]:
        return [None if live is None else live.request for live in self._slots]

    def _step_async(self) -> None:
        """Dispatch step t+1 (budget from the confidences we hold, two steps old) before reading step t. A
        probe (the first draft step after draft-free ones) is read before the next step is planned."""
        probe_read = self._pending is not None and self._pending[2] == "probe"
        if probe_read:
            self._read_pending()
        owners = list(self._slots)
        requests = self._requests_by_slot()
        nxt = None
        if self.planner.active(requests).any():
            caps, budget, kind = self.planner.async_plan(requests, probe_read)
            nxt = (self._dispatch(caps, budget, kind), owners, kind)
        self._read_pending()
        self._pending = nxt

    def _read_pending(self) -> None:
        if self._pending is not None:
            out, owners, _ = self._pending
            self._pending = None
            self._deliver(jax.device_get(out), owners)

    # ---- host bookkeeping --------------------------------------------------------------------------
    def _deliver(self, out: device_step.StepOutput, owners: list[LiveRequest | None]) -> None:
        self.planner.observed(out.confidence)
        now = time.perf_counter()
        for i, live in enumerate(owners):
            if live is None or live.done.is_set() or self._slots[i] is not live:
                continue
            if bool(out.nonfinite[i]):  # deactivated on device; the other slots are unaffected
                self._slots[i] = None
                self._fail_nonfinite(live, len(live.request.prompt_ids) + len(live.tokens) - 1)
                continue
            n = int(out.count[i])
            if n == 0:
                continue
            st = live.stats
            st.rounds += 1
            st.verified_draft += int(out.verified[i])
            st.accepted_draft += int(out.accepted[i])
            st.no_draft_rounds += int(out.verified[i]) == 0
            new = [int(t) for t in out.committed[i, :n]]
            extra = first_stop(new, live.request.stop_ids)
            if extra is not None:  # a request's own stop token: cut there and free the slot
                new = new[:extra + 1]
            self._emit(live, new, now)
            if self.observer is not None:
                self.observer.on_round(live.rid, int(out.verified[i]), int(out.accepted[i]), len(new),
                                       int(out.verified[i]) > 0)
            if extra is not None:
                self._state = self._deactivate(self._state, jnp.int32(i))
                self._release(live, "stop")
            elif bool(out.finished[i]):
                self._release(live, "stop" if new[-1] in self.stop_ids else "length")

    def _fail_nonfinite(self, live: LiveRequest, position: int) -> None:
        live.stats.error = (f"the target's logits are not finite (NaN or inf) at position {position}: the model or "
                            f"this input is numerically broken; the request was stopped")
        logging.getLogger(__name__).error("request %d: %s", live.rid, live.stats.error)
        self._finish(live, "error")

    def _emit(self, live: LiveRequest, new: list[int], now: float) -> None:
        if live.stats.first_token_at is None and new:
            live.stats.first_token_at = now
        live.tokens.extend(new)
        live.stats.output_tokens += len(new)
        for t in new:
            live.out.put(t)

    def _release(self, live: LiveRequest, reason: str) -> None:
        if live.slot is not None and self._slots[live.slot] is live:
            self._slots[live.slot] = None
        self._finish(live, reason)

    def _finish(self, live: LiveRequest, reason: str) -> None:
        live.stats.finished_at = time.perf_counter()
        live.stats.finish_reason = reason
        live.out.put(None)
        live.done.set()
        if self.observer is not None:
            self.observer.on_finish(live.rid, dataclasses.replace(live.stats))

    def _reap_cancelled(self) -> None:
        for i, live in enumerate(self._slots):
            if live is not None and live.cancel_requested:
                self._state = self._deactivate(self._state, jnp.int32(i))
                self._release(live, "cancelled")

    def _admit_queued(self) -> None:
        for i in range(self.config.slots):
            if self._slots[i] is not None or not self._queue:
                continue
            live = self._queue.popleft()
            r = live.request
            ids = list(r.prompt_ids)
            width = next(p for p in self._admit_exec if p >= len(ids))
            prompt = np.zeros(width, np.int32)
            prompt[:len(ids)] = ids
            params = SamplingParams.create(1, r.temperature, r.top_k, r.top_p)
            if self.observer is not None:
                self.observer.on_start(live.rid)
            try:
                self._state, *flags = self._admit_exec[width](
                    **self._dynamic, state=self._state, slots=np.asarray([i], np.int32),
                    prompts=prompt[None], prompt_lens=np.asarray([len(ids)], np.int32), params=params,
                    max_new_tokens=np.asarray([r.max_new_tokens], np.int32),
                    keys=request_keys([request_key_data(self.config.seed + live.rid if r.seed is None else r.seed,
                                                        ids)]), stops=self._stops)
            except Exception as e:  # noqa: BLE001 — this request fails, the others go on
                live.stats.error = f"{type(e).__name__}: {e}"
                logging.getLogger(__name__).error("request %d failed at admission: %s", live.rid, live.stats.error)
                self._finish(live, "error")
                continue
            first, finished, nonfinite = (x[0] for x in jax.device_get(flags))
            if nonfinite:  # this request fails alone: its slot was never activated
                self._fail_nonfinite(live, len(ids))
                continue
            live.slot = i
            self._slots[i] = live
            self.planner.admitted(i)
            first, finished = int(first), bool(finished)
            self._emit(live, [first], time.perf_counter())
            if first_stop([first], r.stop_ids) is not None and not finished:
                self._state = self._deactivate(self._state, jnp.int32(i))
                finished = True
            if finished:
                own = first in self.stop_ids or first in (r.stop_ids or ())
                self._release(live, "stop" if own else "length")

    def _get(self, rid: int) -> LiveRequest:
        try:
            return self._requests[rid]
        except KeyError:
            raise KeyError(f"unknown request id {rid}") from None

"""Closed-loop load generation against an engine: C clients, each submitting its next request when the
previous one finishes; aggregate and per-user tokens/s and verification lengths."""
from __future__ import annotations

import collections
import dataclasses
import gc
import threading
import time
from typing import Sequence

from dspark_jax.serving.engine import Engine, EngineConfig
from dspark_jax.serving.requests import Request


def engine_config(spec: str, **kwargs) -> EngineConfig:
    """'plain' | 'fixedN' | 'threshold[@T]' | 'scheduler' | 'scheduler_async' → EngineConfig."""
    name, _, value = spec.partition("@")
    if name.startswith("fixed") and name[5:].isdigit():
        return EngineConfig(policy="fixed", gamma=int(name[5:]), **kwargs)
    if name == "threshold":
        return EngineConfig(policy="threshold", threshold=float(value) if value else 0.5, **kwargs)
    if name in ("plain", "scheduler", "scheduler_async") and not value:
        return EngineConfig(policy=name, **kwargs)
    raise ValueError(f"unknown policy {spec!r} (plain, fixedN, threshold[@T], scheduler, scheduler_async)")


@dataclasses.dataclass(frozen=True)
class LoadResult:
    policy: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    aggregate_tps: float        # all committed tokens / wall time
    per_user_tps: float         # mean over requests of tokens / latency
    verified_per_round: float   # draft tokens verified per request per step (pooled)
    accept_length: float        # committed tokens per round, bonus included (pooled)
    steps: int
    bucket_counts: dict
    plain_steps: int = 0        # steps without the drafter (the scheduler's plain fallback)
    kv_counts: dict = dataclasses.field(default_factory=dict)  # timed steps per cache length attended


def closed_loop(engine: Engine, policy: str, prompts: Sequence[Sequence[int]], concurrency: int,
                requests_per_client: int, max_new_tokens: int, warmup_tokens: int = 4,
                temperature: float = 0.0) -> LoadResult:
    """Runs `concurrency` clients × `requests_per_client` requests (sampled at `temperature`, no top-k / top-p;
    0: greedy; request i of client c seeded c · requests_per_client + i, so runs repeat) on a started-or-not
    engine. Before timing, garbage from earlier engines is collected and `concurrency` untimed requests of
    `warmup_tokens` tokens run (0: none): without both, whichever engine ran first at a new size measured
    10–20 % slow."""
    if not prompts:
        raise ValueError("no prompts")
    started_here = not engine.running
    engine.start()
    gc.collect()
    if warmup_tokens:
        warm = [engine.submit(Request(list(prompts[c % len(prompts)]), max_new_tokens=warmup_tokens))
                for c in range(concurrency)]
        for rid in warm:
            engine.result(rid)
    steps0, plain0 = engine.steps, engine.plain_steps
    buckets0, kv0 = collections.Counter(engine.bucket_counts), collections.Counter(engine.kv_counts)
    ids: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(c: int) -> None:
        try:
            for j in range(requests_per_client):
                prompt = prompts[(c * requests_per_client + j) % len(prompts)]
                rid = engine.submit(Request(list(prompt), max_new_tokens=max_new_tokens, temperature=temperature,
                                            seed=c * requests_per_client + j))
                with lock:
                    ids.append(rid)
                engine.result(rid)
        except BaseException as e:  # noqa: BLE001 — reported after the run
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if started_here:
        engine.shutdown()
    if errors:
        raise errors[0]
    stats = [engine.stats(i) for i in ids]
    bad = [s for s in stats if s.finish_reason not in ("stop", "length")]
    if bad:
        raise RuntimeError(f"{len(bad)} requests did not complete: {bad[0].finish_reason} {bad[0].error or ''}")
    out_tokens = sum(s.output_tokens for s in stats)
    rounds = sum(s.rounds for s in stats)
    return LoadResult(policy=policy, concurrency=concurrency, requests=len(stats), output_tokens=out_tokens,
                      wall_s=wall, aggregate_tps=out_tokens / wall,
                      per_user_tps=sum(s.tokens_per_s for s in stats) / len(stats),
                      verified_per_round=sum(s.verified_draft for s in stats) / max(rounds, 1),
                      accept_length=sum(s.output_tokens - 1 for s in stats) / max(rounds, 1),
                      steps=engine.steps - steps0, bucket_counts=dict(engine.bucket_counts - buckets0),
                      plain_steps=engine.plain_steps - plain0, kv_counts=dict(engine.kv_counts - kv0))

"""A controlled A/B test of speculative decoding (FinOps guide, phase 3) on one engine and one machine.

Arms: `baseline` -- every class with speculation off (plain decoding) -- and `accelerated` -- the policy as
written. Each arm has its own Governor (so its own metrics, costs and rollback state) on the same Engine. The
same prompts run in both arms: the workload (classes interleaved) is cut into blocks of `concurrency` requests
and every block runs once per arm, arm after arm, the first arm alternating from block to block (AB, BA, AB,
...) so that machine drift (other jobs, thermal state) weighs on both arms alike. Arms never overlap in time,
so each arm's busy time, and hence cost, is its own.

    result = run_ab(engine, policy, {"code": [ids, ...], "math": [...]}, tenant="production", max_new_tokens=32,
                    concurrency=3)
    # then dspark_jax.governance.ab_report: tables, recommendations, plots
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Mapping, Sequence

from dspark_jax.governance.governor import Governor, RequestRejected
from dspark_jax.governance.policy import GovernancePolicy
from dspark_jax.governance.serving import GovernedEngine
from dspark_jax.serving.engine import Engine
from dspark_jax.serving.requests import Request

ARMS = ("baseline", "accelerated")
CLASS_PROMPT_SETS = {"code": "humaneval", "math": "gsm8k", "chat": "mt-bench"}
"""Evaluation prompt set of each workload class the A/B command can replay (gsm8k: its first 200 lines)."""


def baseline_policy(policy: GovernancePolicy) -> GovernancePolicy:
    """The policy with speculation off for every class (and so no rollback); everything else unchanged."""
    classes = tuple(dataclasses.replace(c, speculate=False, max_draft=0, scheduler_mode="off", rollback=None)
                    for c in policy.classes)
    return dataclasses.replace(policy, classes=classes)


def check_workload(policy: GovernancePolicy, tenant: str, classes: Sequence[str], max_new_tokens: int) -> None:
    """Raises ValueError (one line) unless `tenant` may send `max_new_tokens`-token requests of every class."""
    t = policy.tenant(tenant)
    if t is None:
        raise ValueError(f"unknown tenant {tenant!r} in {policy.source} (tenants: {', '.join(policy.tenant_names)})")
    if not classes:
        raise ValueError("no workload classes given")
    for name in classes:
        cls = policy.workload_class(name)
        if cls is None:
            raise ValueError(f"unknown workload class {name!r} in {policy.source} (classes: "
                             f"{', '.join(policy.class_names)})")
        if name not in t.classes:
            raise ValueError(f"tenant {tenant!r} may not use workload class {name!r} (allowed: {', '.join(t.classes)})")
        if max_new_tokens > cls.sampling.max_new_tokens:
            raise ValueError(f"max_new_tokens {max_new_tokens} exceeds the cap of {cls.sampling.max_new_tokens} of "
                             f"workload class {name!r}")


def interleave(prompts_by_class: Mapping[str, Sequence[Sequence[int]]]) -> list[tuple[str, int, list[int]]]:
    """(class, index, prompt ids), classes interleaved and their order rotated from one prompt index to the next
    (code 0, math 0, chat 0, math 1, chat 1, code 1, ...): requests admitted in the same engine step start one
    after the other, so no class is always first (busy-time cost shares depend on that order)."""
    names = list(prompts_by_class)
    n = max((len(p) for p in prompts_by_class.values()), default=0)
    out = []
    for i in range(n):
        for cls in names[i % len(names):] + names[:i % len(names)]:
            if i < len(prompts_by_class[cls]):
                out.append((cls, i, list(prompts_by_class[cls][i])))
    return out


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_ab(engine: Engine, policy: GovernancePolicy, prompts_by_class: Mapping[str, Sequence[Sequence[int]]], *,
           tenant: str, max_new_tokens: int, concurrency: int, warmup: bool = True,
           progress: Callable[[str], None] | None = _stderr) -> dict:
    """Runs the A/B test (see the module docstring) and returns a JSON-ready result: settings, each arm's
    governor snapshot, every request's record (arm, block, class, prompt index, admitted settings, engine
    stats, output tokens) and the accelerated arm's speculation switches. The engine must be idle and have no
    other observer; it may run its loop in a thread (`engine.start()`) or be driven from here."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    check_workload(policy, tenant, list(prompts_by_class), max_new_tokens)
    items = interleave(prompts_by_class)
    if not items:
        raise ValueError("no prompts")
    say = progress or (lambda message: None)
    arms = {"baseline": GovernedEngine(engine, Governor(baseline_policy(policy))),
            "accelerated": GovernedEngine(engine, Governor(policy))}
    if warmup:  # one short ungoverned request: first-call allocations are nobody's cost
        _wait(engine, [engine.submit(Request(items[0][2], max_new_tokens=2))])
    blocks = [items[i:i + concurrency] for i in range(0, len(items), concurrency)]
    records: list[dict] = []
    wall = dict.fromkeys(ARMS, 0.0)
    t_start = time.time()
    for b, block in enumerate(blocks):
        for arm in (ARMS if b % 2 == 0 else ARMS[::-1]):
            governed = arms[arm]
            t0 = time.perf_counter()
            submitted = []
            for cls, index, ids in block:
                base = dict(arm=arm, block=b, workload_class=cls, prompt_index=index, prompt_tokens=len(ids))
                try:
                    submitted.append((base, governed.submit(tenant, prompt_ids=ids, workload_class=cls,
                                                            max_new_tokens=max_new_tokens)))
                except RequestRejected as e:
                    records.append(dict(base, finish_reason="rejected", rejection_code=e.code, error=e.reason))
            _wait(engine, [rid for _, rid in submitted])
            dt = time.perf_counter() - t0
            wall[arm] += dt
            block_records = [dict(base, **_record(governed, rid)) for base, rid in submitted]
            records += block_records
            say(f"[block {b + 1}/{len(blocks)}] {arm:<11}: {len(block)} requests "
                f"({', '.join(c for c, _, _ in block)}) in {dt:.1f} s; {_summary(block_records)}")
    acc = arms["accelerated"].governor
    return dict(
        tenant=tenant, classes=list(prompts_by_class), requests_per_class={c: len(p) for c, p in
                                                                         prompts_by_class.items()},
        max_new_tokens=max_new_tokens, concurrency=concurrency, blocks=len(blocks), started=t_start,
        engine=dict(policy=engine.config.policy, slots=engine.config.slots, max_len=engine.config.max_len,
                    gamma=engine.gamma, threshold=engine.config.threshold),
        policy_source=policy.source, cost_per_hour_usd=policy.cost_per_hour_usd,
        arm_wall_s=wall, snapshots={arm: g.snapshot() for arm, g in arms.items()},
        switches=[dataclasses.asdict(e) for e in acc.switches],
        class_states={c: acc.class_state(c) for c in prompts_by_class},
        requests=records)


def _wait(engine: Engine, rids: Sequence[int]) -> None:
    if not engine.running:  # nobody drives the engine: we do
        engine.run_until_idle()
    for rid in rids:
        engine.result(rid)


def _record(governed: GovernedEngine, rid: int) -> dict:
    a, st = governed.admission(rid), governed.stats(rid)
    return dict(request_id=a.request_id, speculate=a.speculate, scheduler_mode=a.scheduler_mode,
                max_draft=a.max_draft, confidence_floor=a.confidence_floor, temperature=a.temperature,
                probe=a.probe, output_tokens=st.output_tokens, rounds=st.rounds, verified_draft=st.verified_draft,
                accepted_draft=st.accepted_draft, no_draft_rounds=st.no_draft_rounds, latency_s=st.latency_s,
                first_token_s=None if st.first_token_at is None else st.first_token_at - st.submitted_at,
                finish_reason=st.finish_reason, error=st.error, tokens=governed.tokens(rid))


def _summary(records: Sequence[dict]) -> str:
    rounds = sum(r["rounds"] for r in records)
    out = sum(r["output_tokens"] for r in records)
    verified = sum(r["verified_draft"] for r in records)
    accepted = sum(r["accepted_draft"] for r in records)
    tau = f"{sum(r['output_tokens'] - 1 for r in records if r['rounds']) / rounds:.2f}" if rounds else "n/a"
    acc = f"{accepted / verified:.0%}" if verified else "n/a"
    return f"{out} tokens, {rounds} rounds, tau {tau}, acceptance {acc}"

"""Serving engine: exact greedy output under every policy with more requests than slots, slot reuse,
cancellation, stop tokens, streaming, a background thread, compile-once buckets, request errors, and
losslessness of scheduled decoding at temperature 1 (chi-square)."""
from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.testing.tiny_configs import tiny_gemma3
from dspark_jax.sampling import FilterMode, SamplingParams
from dspark_jax.drafters.factory import random_drafter
from dspark_jax.models.transformer import Transformer
from dspark_jax.decoding.speculative import draft_head
from dspark_jax.serving import device_step
from dspark_jax.serving.engine import Engine, EngineConfig
from dspark_jax.serving.engine_config import kv_buckets
from dspark_jax.serving.requests import Request, RequestError
from dspark_jax.serving.cost_table import CostTable
from dspark_jax.serving.scheduler import capacity, schedule_synchronous
from dspark_jax.target import Target
from dspark_jax.testing.compiles import counting_compiles
from dspark_jax.testing.tiny_target import CharTokenizer, make_tiny_target, plain_greedy

TABLE = CostTable((4, 8, 16), (100.0, 70.0, 40.0))  # jagged enough that policies differ


@pytest.fixture(scope="module")
def target():
    return make_tiny_target()


@pytest.fixture(scope="module")
def drafter(target):
    return random_drafter(target, "dspark", gamma=3, num_layers=1)


PROMPTS = [list(np.random.default_rng(i).integers(3, 97, size=3 + (5 * i) % 11)) for i in range(9)]


@pytest.fixture(scope="module")
def expected(target):
    return [plain_greedy(target, p, 12 + i) for i, p in enumerate(PROMPTS)]


def make_engine(target, drafter, policy="scheduler", **kw):
    return Engine(target, drafter, EngineConfig(slots=4, max_len=64, policy=policy, **kw), cost_table=TABLE)


@pytest.mark.parametrize("policy", ["plain", "fixed", "threshold", "scheduler", "scheduler_async"])
def test_every_policy_gives_plain_greedy_output_for_more_requests_than_slots(target, drafter, expected, policy):
    engine = make_engine(target, drafter, policy)
    ids = [engine.submit(Request(p, max_new_tokens=12 + i)) for i, p in enumerate(PROMPTS)]
    engine.run_until_idle()
    assert [engine.tokens(i) for i in ids] == expected
    for i, rid in enumerate(ids):
        st = engine.stats(rid)
        assert st.output_tokens == len(expected[i]) and st.finish_reason in ("stop", "length")
        assert st.rounds >= 1 and 0 <= st.accepted_draft <= st.verified_draft
        if policy == "plain":
            assert st.verified_draft == 0 and st.no_draft_rounds == st.rounds
    assert set(engine.bucket_counts) <= set(engine.compiled_shapes["step"])


def serve_prompts_counting_compiles(engine, expected) -> list:
    """Serves PROMPTS (output checked against `expected`); returns the XLA compilations it ran. A fresh engine
    must run none, also as the first engine of a process (no eager jnp op on the host path)."""
    def serve():
        ids = [engine.submit(Request(p, max_new_tokens=12 + i)) for i, p in enumerate(PROMPTS)]
        engine.run_until_idle()
        assert [engine.tokens(i) for i in ids] == expected
    return counting_compiles(serve)


def test_buckets_compile_once_at_start_and_never_again(target, drafter, expected):
    engine = make_engine(target, drafter, "fixed", gamma=1)
    assert engine.compiled_shapes["step"] == (4, 8, 16)
    compiles = serve_prompts_counting_compiles(engine, expected)
    assert compiles == []
    assert set(engine.bucket_counts) == {4, 8}  # 4 slots × (anchor + 1 draft); the tail with fewer requests
    assert counting_compiles(lambda: jax.jit(lambda x: x * 3 + 1)(jnp.ones(3)))  # the listener sees compilations


@pytest.mark.parametrize("policy", ["fixed", "scheduler_async"])
def test_steps_attend_over_the_shortest_cache_length_and_give_plain_greedy_output(target, drafter, expected, policy):
    engine = make_engine(target, drafter, policy, kv_buckets=(16, 32, 64))
    assert engine.compiled_shapes["kv"] == (16, 32, 64)
    assert serve_prompts_counting_compiles(engine, expected) == []
    assert len(engine.kv_counts) >= 2 and sum(engine.kv_counts.values()) == engine.steps
    # the rule: prompt + delivered tokens + 2 (G + 1) rows, rounded up to a compiled length, capped at max_len
    assert engine._kv_bucket([3 + 1 + 8]) == 16 and engine._kv_bucket([17]) == 32 and engine._kv_bucket([99]) == 64


def test_cache_lengths_no_step_can_use_are_refused(target, drafter):
    with pytest.raises(ValueError, match=r"below 9 rows .* would never be used"):
        make_engine(target, drafter, "fixed", kv_buckets=(8, 16, 64))


def test_set_cost_table_checks_the_buckets_and_prices_the_next_steps(target, drafter):
    engine = make_engine(target, drafter)
    with pytest.raises(ValueError, match="differ from the engine's"):
        engine.set_cost_table(CostTable((4, 8), (1.0, 1.0)))
    other = CostTable((4, 8, 16), (10.0, 9.0, 8.0))
    engine.set_cost_table(other)
    assert engine.cost_table is other and engine.planner.cost_table is other


def test_kv_buckets_must_end_at_max_len():
    for bad in ((16, 32), (32, 16, 64), (), (0, 64)):
        with pytest.raises(ValueError, match="kv_buckets"):
            EngineConfig(max_len=64, kv_buckets=bad)
    assert EngineConfig(max_len=512).cache_lengths == (512,)
    assert EngineConfig(max_len=512, kv_buckets=(128, 256, 512)).cache_lengths == (128, 256, 512)
    assert kv_buckets(512) == (128, 256, 512) and kv_buckets(1000) == (128, 256, 512, 1000)
    assert kv_buckets(64) == (64,)


def test_cancellation_frees_the_slot_without_disturbing_others(target, drafter, expected):
    engine = make_engine(target, drafter)
    ids = [engine.submit(Request(p, max_new_tokens=12 + i)) for i, p in enumerate(PROMPTS[:6])]
    engine.step()
    engine.step()
    engine.cancel(ids[1])  # running
    engine.cancel(ids[5])  # still queued
    engine.run_until_idle()
    for i in (0, 2, 3, 4):
        assert engine.tokens(ids[i]) == expected[i]
    got = engine.tokens(ids[1])
    assert engine.stats(ids[1]).finish_reason == "cancelled" and got == expected[1][:len(got)]
    assert engine.stats(ids[5]).finish_reason == "cancelled" and engine.tokens(ids[5]) == []


def test_per_request_stop_tokens_and_streaming(target, drafter, expected):
    engine = make_engine(target, drafter)
    want = expected[2]
    stop = want[4]
    rid = engine.submit(Request(PROMPTS[2], max_new_tokens=14, stop_ids=[stop]))
    other = engine.submit(Request(PROMPTS[0], max_new_tokens=12))
    streamed = list(engine.stream(rid))
    cut = want.index(stop) + 1
    assert streamed == want[:cut] and engine.stats(rid).finish_reason == "stop"
    assert engine.result(other) == expected[0]


def test_background_thread_with_concurrent_clients(target, drafter, expected):
    engine = make_engine(target, drafter, "scheduler_async")
    engine.start()
    results = {}

    def client(i):
        rid = engine.submit(Request(PROMPTS[i], max_new_tokens=12 + i))
        results[i] = list(engine.stream(rid))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    engine.shutdown()
    assert [results[i] for i in range(len(PROMPTS))] == expected


def test_bad_requests_are_rejected_with_clear_messages(target, drafter):
    engine = make_engine(target, drafter)
    with pytest.raises(RequestError, match="empty"):
        engine.submit(Request([]))
    with pytest.raises(RequestError, match="exceeds the engine's max_len"):
        engine.submit(Request([3] * 40, max_new_tokens=30))
    with pytest.raises(RequestError, match="top_p"):
        engine.submit(Request([3, 4], max_new_tokens=8, top_p=0.5))
    with pytest.raises(RequestError, match="vocabulary"):
        engine.submit(Request([3, 400], max_new_tokens=8))
    with pytest.raises(RequestError, match="draft_mode"):
        engine.submit(Request([3, 4], max_new_tokens=8, draft_mode="turbo"))
    with pytest.raises(KeyError, match="unknown request"):
        engine.stats(12345)


def test_engine_profiles_its_buckets_when_given_no_cost_table(target, drafter):
    engine = Engine(target, drafter, EngineConfig(slots=2, max_len=64, policy="scheduler"))
    table = engine.cost_table
    assert table.buckets == engine.compiled_shapes["step"] == (2, 4, 8)
    assert engine.compiled_shapes["plain_step"] == (2,)
    assert all(s > 0 for s in table.steps_per_s) and table.plain_steps_per_s > 0 and engine.idle
    rid = engine.submit(Request(PROMPTS[0], max_new_tokens=12))
    assert engine.result(rid) == plain_greedy(target, PROMPTS[0], 12)


def test_engine_profile_times_interleaved_passes_and_takes_medians(target, drafter, monkeypatch):
    engine = Engine(target, drafter, EngineConfig(slots=2, max_len=64, policy="scheduler"), cost_table=TABLE)
    timings = engine.profile_timings(steps=2, passes=3)
    assert set(timings) == {2, 4, 8, "plain"} and engine.idle
    assert all(len(timings[b]) == 6 for b in (2, 4, 8)) and len(timings["plain"]) == 12  # timed first and last
    fixed = {2: [0.1, 0.5, 0.2], 4: [0.4, 0.25, 9.0], 8: [1.0, 0.5, 0.5], "plain": [0.2, 0.125, 0.05, 7.0]}
    monkeypatch.setattr(engine, "profile_timings", lambda *a, **k: {key: list(v) for key, v in fixed.items()})
    table = engine.profile()
    assert table.buckets == (2, 4, 8) and table.steps_per_s == pytest.approx((5.0, 2.5, 2.0))
    assert table.plain_steps_per_s == pytest.approx(1 / 0.1625)
    with pytest.raises(ValueError, match="passes"):
        Engine.profile_timings(engine, steps=1, passes=0)  # the method itself, not the patched attribute
    rid = engine.submit(Request(PROMPTS[0], max_new_tokens=12))  # the profile left the engine serving
    assert engine.result(rid) == plain_greedy(target, PROMPTS[0], 12)


@pytest.mark.parametrize("policy", ["scheduler", "scheduler_async"])
def test_plain_fallback_runs_the_target_alone_when_drafting_does_not_pay(target, drafter, expected, policy):
    never = dataclasses.replace(TABLE, plain_steps_per_s=1000.0)  # 10x the fastest draft step: never draft
    engine = Engine(target, drafter, EngineConfig(slots=4, max_len=64, policy=policy, probe_every=3),
                    cost_table=never)
    ids = [engine.submit(Request(p, max_new_tokens=12 + i)) for i, p in enumerate(PROMPTS)]
    engine.run_until_idle()
    assert [engine.tokens(i) for i in ids] == expected
    draft_steps = engine.steps - engine.plain_steps
    probes = draft_steps - (3 if policy == "scheduler_async" else 0)  # async drafts until it reads confidences
    assert probes >= 1  # each probe follows 3, 6, 12, 24, 24, ... draft-free steps (backing off, capped at 8x)
    assert engine.plain_steps >= sum(min(3 * 2 ** i, 24) for i in range(probes))
    assert engine.compiled_shapes["plain_step"] == (4,)


def test_request_draft_caps_are_respected(target, drafter, expected):
    engine = make_engine(target, drafter, "fixed")
    capped = engine.submit(Request(PROMPTS[0], max_new_tokens=12, max_draft=1))
    off = engine.submit(Request(PROMPTS[1], max_new_tokens=13, draft_mode="off"))
    floored = engine.submit(Request(PROMPTS[2], max_new_tokens=14, confidence_floor=1.0))  # no c_k reaches 1
    engine.run_until_idle()
    assert engine.tokens(capped) == expected[0] and engine.tokens(off) == expected[1]
    assert engine.tokens(floored) == expected[2] and engine.stats(floored).verified_draft == 0
    st = engine.stats(capped)
    assert st.verified_draft <= st.rounds
    assert engine.stats(off).verified_draft == 0


# ---- losslessness of scheduled decoding at temperature 1 ----------------------------------------------

V, N_NEW, S = 6, 3, 6000


@pytest.mark.parametrize("variant", ["synchronous", "production"])
def test_scheduled_decoding_is_lossless_at_temperature_one(variant):
    from tests.decoding.test_speculative import chi_square_pvalue, exact_joint
    cfg = tiny_gemma3(vocab_size=V)
    tg, ts = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tgt = Target(cfg, tg, ts, CharTokenizer(), "tiny-v6")
    dr = random_drafter(tgt, "dspark", gamma=2, num_layers=1, seed=3)
    params = SamplingParams.create(S, 1.0)
    prompt = [1, 3, 2]
    table = CostTable((S, 2 * S, 3 * S), (1.0, 0.7, 0.6))
    model, dmodel = nnx.merge(tg, ts), nnx.merge(dr.graphdef, dr.state)
    state = device_step.init_engine_state(model, dmodel, S, 16)
    stops = jnp.asarray([-1], jnp.int32)
    static = dict(target_graphdef=tg, drafter_graphdef=dr.graphdef, mode=FilterMode())
    head = draft_head(tg, ts, dr.graphdef, dr.state)
    state, first, _, _ = jax.jit(device_step.admit, static_argnames=tuple(static))(
        target_state=ts, drafter_state=dr.state, head=head, state=state, slots=jnp.arange(S), prompts=jnp.tile(
            jnp.asarray(prompt, jnp.int32), (S, 1)), prompt_lens=jnp.full((S,), 3), params=params,
        max_new_tokens=jnp.full((S,), N_NEW), keys=jax.random.split(jax.random.key(7), S), stops=stops, **static)
    step = jax.jit(device_step.step, static_argnames=tuple(static) + ("bucket", "draft"))
    tokens = [np.asarray(first)[:, None]]
    stale = None
    while bool(np.asarray(state.active).any()):
        conf = np.asarray(state.proposal.confidence)
        act = np.asarray(state.active)
        if variant == "synchronous":  # Algorithm 1 (early stop) over all requests on fresh confidences
            caps = np.zeros(S, np.int64)
            caps[act] = schedule_synchronous(conf[act], table)
            budget = int(caps.sum())
        else:  # budget from stale confidences, fresh top-K ranking on device
            caps = np.where(act, 2, 0)
            budget = capacity(stale[act], table) if stale is not None else S // 2
        stale = conf
        state, out = step(target_state=ts, drafter_state=dr.state, head=head, state=state, caps=jnp.asarray(caps, jnp.int32),
                          floors=jnp.zeros((S,), jnp.float32), draft_budget=jnp.int32(budget), stops=stops,
                          bucket=3 * S, draft=True, **static)
        count = np.asarray(out.count)
        committed = np.asarray(out.committed)
        tokens.append(np.where(np.arange(3)[None] < count[:, None], committed, -1))
    toks = np.concatenate(tokens, 1)
    seqs = np.stack([row[row >= 0][:N_NEW] for row in toks])
    codes = (seqs * (V ** np.arange(N_NEW)[::-1])).sum(1)
    _, prob = exact_joint(tg, ts, prompt, SamplingParams.create(1, 1.0), FilterMode())
    assert chi_square_pvalue(codes, prob) > 1e-3


def test_attention_implementation_is_validated():
    from dspark_jax.generation import GenerationConfig
    assert GenerationConfig(attn_impl="interpret").attn_impl == "interpret"
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        GenerationConfig(attn_impl="cuda")
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        EngineConfig(attn_impl="cuda")


def test_closed_loop_load_samples_at_its_temperature_with_seeded_requests(target, drafter, monkeypatch):
    """`closed_loop(temperature=T)` (serve-bench's --temperature): every timed request samples at T with its own
    seed (client c's request j: c · requests_per_client + j), so a rerun draws the same tokens; warm-up requests
    stay greedy."""
    from dspark_jax.serving.closed_loop import closed_loop
    engine = make_engine(target, drafter)
    submitted, real_submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda r: submitted.append(r) or real_submit(r))
    result = closed_loop(engine, "scheduler", PROMPTS[:4], 2, 2, 6, temperature=0.7)
    timed = submitted[2:]  # after one warm-up request per client
    assert [r.temperature for r in submitted[:2]] == [0.0, 0.0]
    assert sorted(r.seed for r in timed) == [0, 1, 2, 3] and {r.temperature for r in timed} == {0.7}
    assert result.requests == 4 and result.output_tokens <= 4 * 6
    assert sum(result.kv_counts.values()) == result.steps == sum(result.bucket_counts.values()) + result.plain_steps
    assert set(result.kv_counts) == {64}  # the timed steps only, at the engine's one cache length

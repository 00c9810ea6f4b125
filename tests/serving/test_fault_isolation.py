"""Fault isolation: a request whose target logits turn non-finite (here: a NaN embedding row of a token it reads,
in an untied-head target, so other requests are untouched) ends with finish_reason `error` and a clear message —
at admission or mid-generation — while the requests sharing its batch give exactly their normal output and the
engine keeps serving; the jitted loop stops that request too."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.testing.tiny_configs import tiny_qwen3
from dspark_jax.sampling import SamplingParams
from dspark_jax.decoding.speculative import speculative_generate
from dspark_jax.drafters.factory import random_drafter
from dspark_jax.models.transformer import Transformer
from dspark_jax.serving.engine import Engine, EngineConfig
from dspark_jax.serving.requests import Request
from dspark_jax.serving.cost_table import CostTable
from dspark_jax.target import Target
from dspark_jax.testing.tiny_target import CharTokenizer, plain_greedy


@pytest.fixture(scope="module")
def clean():
    cfg = dataclasses.replace(tiny_qwen3(num_layers=2), bos_token_id=2, eos_token_ids=(1,))
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))
    return Target(cfg, graphdef, state, CharTokenizer(), "tiny-qwen3")


def poisoned(target: Target, token: int) -> Target:
    model = nnx.merge(target.graphdef, target.state)
    model.embed_tokens.value = model.embed_tokens.value.at[token].set(jnp.nan)
    graphdef, state = nnx.split(model)
    return dataclasses.replace(target, graphdef=graphdef, state=state)


def _case(clean):
    """A victim prompt whose greedy continuation reads token t at its 3rd step, a bystander that never sees t."""
    rng = np.random.default_rng(0)
    victim = [2] + list(rng.integers(3, 97, 4))
    continuation = plain_greedy(clean, victim, 12)
    t = continuation[2]
    assert t not in victim and t not in continuation[:2]
    for seed in range(1, 200):
        bystander = [2] + list(np.random.default_rng(seed).integers(3, 97, 5))
        expected = plain_greedy(clean, bystander, 12)
        if t not in bystander and t not in expected:
            return victim, continuation, t, bystander, expected
    raise AssertionError("no bystander prompt found")


@pytest.mark.parametrize("policy", ["plain", "fixed"])
def test_engine_fails_the_broken_request_alone(clean, policy):
    victim, continuation, t, bystander, expected = _case(clean)
    target = poisoned(clean, t)
    drafter = random_drafter(target, "dspark", gamma=3, num_layers=1)
    engine = Engine(target, drafter, EngineConfig(slots=3, max_len=64, policy=policy),
                    cost_table=CostTable((3, 12), (10.0, 5.0)))
    at_admission = [2, 5, t, 7]  # reads t in its prompt: fails at prefill
    ids = [engine.submit(Request(prompt_ids=p, max_new_tokens=12)) for p in (victim, bystander, at_admission)]
    engine.run_until_idle()
    for rid in (ids[0], ids[2]):
        st = engine.stats(rid)
        assert st.finish_reason == "error" and "not finite" in st.error
    # the tokens of the rounds before the broken one were delivered: 3 when t is the anchor that breaks, fewer
    # when t was an accepted draft of an earlier round and the next decision read its broken logits
    delivered = engine.tokens(ids[0])
    assert len(delivered) in (1, 2, 3) and delivered == continuation[:len(delivered)]
    assert policy == "fixed" or len(delivered) == 3
    assert engine.tokens(ids[1]) == expected and engine.stats(ids[1]).finish_reason in ("stop", "length")
    again = engine.submit(Request(prompt_ids=bystander, max_new_tokens=12))  # the engine keeps serving
    engine.run_until_idle()
    assert engine.tokens(again) == expected


def test_jitted_loop_stops_the_broken_request(clean):
    victim, continuation, t, bystander, expected = _case(clean)
    target = poisoned(clean, t)
    drafter = random_drafter(target, "dspark", gamma=3, num_layers=1)
    width = 8
    prompts = jnp.asarray([p + [0] * (width - len(p)) for p in (victim, bystander)], jnp.int32)
    out = speculative_generate(target.graphdef, target.state, drafter.graphdef, drafter.state, prompts,
                               jnp.asarray([len(victim), len(bystander)]), jax.random.key(0),
                               SamplingParams.create(2), jnp.float32(0.0), max_new_tokens=12, stop_ids=(1,))
    assert np.asarray(out.nonfinite).tolist() == [True, False]
    n = int(out.num_tokens[0])
    assert n in (1, 2, 3) and np.asarray(out.tokens[0, :n]).tolist() == continuation[:n]
    assert np.asarray(out.tokens[1, :int(out.num_tokens[1])]).tolist() == expected

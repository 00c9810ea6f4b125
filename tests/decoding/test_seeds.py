"""Per-request seeds: a request's sampled tokens depend on its seed and prompt only, not on what shares its batch
— in the jitted loops (plain and speculative) and in the engine (with and without drafts)."""
from __future__ import annotations

import re
from dataclasses import replace

import jax
import numpy as np
import pytest

from dspark_jax.sampling.keys import position_keys, request_key_data, request_keys, row_keys
from dspark_jax.drafters.factory import random_drafter
from dspark_jax.generation import GenerationConfig, generate_text
from dspark_jax.serving.engine import Engine, EngineConfig
from dspark_jax.serving.requests import Request
from dspark_jax.serving.cost_table import CostTable
from dspark_jax.testing.tiny_target import make_tiny_target

PROMPT, OTHERS = "the same request", ["something else entirely", "a third one"]


@pytest.fixture(scope="module")
def target():
    return make_tiny_target()


@pytest.fixture(scope="module")
def drafter(target):
    return random_drafter(target, "dspark", gamma=3, num_layers=1)


def test_request_keys_depend_on_seed_and_prompt_only():
    a = request_keys([request_key_data(7, [2, 5, 6])])
    assert np.array_equal(jax.random.key_data(a), jax.random.key_data(request_keys([request_key_data(7, [2, 5, 6])])))
    for other in ([request_key_data(8, [2, 5, 6])], [request_key_data(7, [2, 5, 7])]):
        assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(request_keys(other)))
    assert request_key_data(2 ** 40 + 3, [1])[0] < 2 ** 32 and request_key_data(-1, [1])[0] >= 0
    keys = row_keys(jax.random.key(0), 3)
    assert keys.shape == (3,) and row_keys(keys, 3) is keys
    with pytest.raises(ValueError, match="keys of shape"):
        row_keys(keys, 4)
    p = position_keys(keys, np.array([4, 4, 5]), 1)
    assert not np.array_equal(jax.random.key_data(p[0]), jax.random.key_data(position_keys(keys, 4, 2)[0]))


@pytest.mark.parametrize("speculative", [False, True])
def test_jitted_loop_alone_or_in_a_batch(target, drafter, speculative):
    cfg = GenerationConfig(max_new_tokens=16, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    d = drafter if speculative else None
    alone = generate_text(target, [PROMPT], replace(cfg, batch_size=1), drafter=d)
    batch = generate_text(target, [OTHERS[0], PROMPT, OTHERS[1]], replace(cfg, batch_size=3), drafter=d)
    assert alone[0].completion_ids == batch[1].completion_ids
    reseeded = generate_text(target, [PROMPT] * 4, replace(cfg, seed=8, batch_size=4), drafter=d)
    assert all(r.completion_ids == reseeded[0].completion_ids for r in reseeded)  # same prompt, same seed
    assert reseeded[0].completion_ids != alone[0].completion_ids  # another seed: another sample (16 tokens)


def _engine_tokens(target, drafter, policy, requests):
    engine = Engine(target, drafter, EngineConfig(slots=4, max_len=64, policy=policy, gamma=3),
                    cost_table=CostTable((4, 16), (10.0, 5.0)))
    ids = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    return [engine.tokens(i) for i in ids]


@pytest.mark.parametrize("policy", ["plain", "fixed", "threshold"])
def test_engine_alone_or_with_others(target, drafter, policy):
    enc = target.tokenizer.encode
    mine = Request(prompt_ids=enc(PROMPT), max_new_tokens=14, temperature=0.8, seed=123)
    others = [Request(prompt_ids=enc(p), max_new_tokens=20, temperature=1.0, seed=i) for i, p in enumerate(OTHERS)]
    alone = _engine_tokens(target, drafter, policy, [mine])[0]
    crowded = _engine_tokens(target, drafter, policy, [others[0], mine, others[1]])[1]
    assert alone == crowded
    if policy == "fixed":  # drafts change the path, not the seed's determinism; another seed → another sample
        assert _engine_tokens(target, drafter, policy, [replace(mine, seed=124)])[0] != alone


@pytest.mark.parametrize("threshold,with_drafter,message", [
    (1.5, True, "confidence_threshold must be in [0, 1], got 1.5"),
    (0.5, False, "confidence_threshold needs a drafter"),
])
def test_generate_text_rejects_a_threshold_it_cannot_use(target, drafter, threshold, with_drafter, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_text(target, [PROMPT], GenerationConfig(max_new_tokens=2), drafter=drafter if with_drafter else None,
                      confidence_threshold=threshold)

"""The jitted AR loop: batching with different prompt lengths, stop tokens, exact max_new_tokens."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.decoding.autoregressive import generate
from dspark_jax.sampling import FilterMode, SamplingParams
from dspark_jax.testing.tiny_configs import tiny_gemma3, tiny_qwen3
from dspark_jax.models.transformer import Transformer


def tiny_config(family="gemma3"):
    return tiny_gemma3() if family == "gemma3" else tiny_qwen3()


@pytest.fixture(scope="module", params=["gemma3", "qwen3"])
def model(request):
    return nnx.split(Transformer(tiny_config(request.param), rngs=nnx.Rngs(0), dtype=jnp.float32))


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16], [20]]


def _batch(prompts, width=16):
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_equals_one_at_a_time(model, temperature):
    graphdef, state = model
    tokens, lens = _batch(PROMPTS)
    kw = dict(max_new_tokens=12, stop_ids=())
    key = jax.random.key(3)
    batched = generate(graphdef, state, tokens, lens, key, SamplingParams.create(3, temperature), **kw)
    assert batched.tokens.shape == (3, 12)
    assert (np.asarray(batched.num_tokens) == 12).all()
    if temperature == 0:
        for i, p in enumerate(PROMPTS):
            t1, l1 = _batch([p], width=len(p))
            single = generate(graphdef, state, t1, l1, key, SamplingParams.create(1), **kw)
            np.testing.assert_array_equal(np.asarray(single.tokens[0]), np.asarray(batched.tokens[i]))


def test_greedy_matches_manual_argmax_loop(model):
    """Reference: recompute the whole sequence without a cache at every step."""
    from dspark_jax.models.kv_cache import init_cache
    graphdef, state = model
    m = nnx.merge(graphdef, state)
    prompt = PROMPTS[1]
    tokens, lens = _batch([prompt])
    out = generate(graphdef, state, tokens, lens, jax.random.key(0), SamplingParams.create(1),
                   max_new_tokens=6, stop_ids=())
    seq = list(prompt)
    for _ in range(6):
        t = len(seq)
        o = m(jnp.asarray([seq]), jnp.arange(t)[None], init_cache(m.config, 1, t), jnp.zeros((1,), jnp.int32))
        seq.append(int(jnp.argmax(m.logits(o.hidden[0, -1]))))
    assert np.asarray(out.tokens[0]).tolist() == seq[len(prompt):]


def test_stop_token_ends_request_and_pads(model):
    graphdef, state = model
    tokens, lens = _batch(PROMPTS)
    free = generate(graphdef, state, tokens, lens, jax.random.key(0), SamplingParams.create(3),
                    max_new_tokens=10, stop_ids=())
    stop = int(free.tokens[0, 3])  # the 4th token of request 0 becomes a stop token
    out = generate(graphdef, state, tokens, lens, jax.random.key(0), SamplingParams.create(3),
                   max_new_tokens=10, stop_ids=(stop,), pad_id=0)
    toks, counts = np.asarray(out.tokens), np.asarray(out.num_tokens)
    first = int(np.argmax(np.asarray(free.tokens[0]) == stop))
    assert counts[0] == first + 1
    assert (toks[0, counts[0]:] == 0).all()
    np.testing.assert_array_equal(toks[0, :counts[0]], np.asarray(free.tokens[0, :counts[0]]))
    for i in (1, 2):  # other requests unaffected up to their own stop
        n = counts[i]
        np.testing.assert_array_equal(toks[i, :n], np.asarray(free.tokens[i, :n]))


def test_sampling_is_seeded_and_respects_top_k(model):
    graphdef, state = model
    tokens, lens = _batch(PROMPTS)
    params = SamplingParams.create(3, temperature=1.0, top_k=1)
    a = generate(graphdef, state, tokens, lens, jax.random.key(1), params, max_new_tokens=8, stop_ids=(),
                 mode=FilterMode(max_top_k=1))
    greedy = generate(graphdef, state, tokens, lens, jax.random.key(1), SamplingParams.create(3),
                      max_new_tokens=8, stop_ids=())
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(greedy.tokens))  # top_k=1 == greedy
    p = SamplingParams.create(3, temperature=1.0)
    s1 = generate(graphdef, state, tokens, lens, jax.random.key(7), p, max_new_tokens=8, stop_ids=())
    s2 = generate(graphdef, state, tokens, lens, jax.random.key(7), p, max_new_tokens=8, stop_ids=())
    np.testing.assert_array_equal(np.asarray(s1.tokens), np.asarray(s2.tokens))


def test_mismatched_batch_inputs_fail_while_tracing(model):
    """chex checks at the loop's jit boundary name the mismatch before anything runs."""
    graphdef, state = model
    tokens, lens = _batch(PROMPTS)
    with pytest.raises(AssertionError, match="shape"):
        generate(graphdef, state, tokens, lens[:2], jax.random.key(0), SamplingParams.create(3), max_new_tokens=4,
                 stop_ids=())
    with pytest.raises(AssertionError, match="shape"):
        generate(graphdef, state, tokens, lens, jax.random.key(0), SamplingParams.create(2), max_new_tokens=4,
                 stop_ids=())
    with pytest.raises(AssertionError, match="type"):
        generate(graphdef, state, tokens.astype(jnp.float32), lens, jax.random.key(0), SamplingParams.create(3),
                 max_new_tokens=4, stop_ids=())

"""The real embedded Gemma 3 270M against HF transformers' own GGUF loading of the same file (slow)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n"]


@pytest.fixture(scope="module")
def hf_model(default_gguf_path):
    from tests.hf_fixtures import hf_from_gguf
    return hf_from_gguf(default_gguf_path, "model")


@pytest.fixture(scope="module")
def target():
    from dspark_jax.target import load_target
    return load_target(None, dtype=jnp.float32)


@pytest.fixture(scope="module")
def hf_tokenizer(default_gguf_path):
    from tests.hf_fixtures import hf_from_gguf
    return hf_from_gguf(default_gguf_path, "tokenizer")


def _our_forward(target, ids, taps):
    from dspark_jax.models.kv_cache import init_cache
    model = target.model
    tokens = jnp.asarray([ids], jnp.int32)
    pos = jnp.arange(len(ids), dtype=jnp.int32)[None]
    out = model(tokens, pos, init_cache(target.config, 1, len(ids)), jnp.zeros((1,), jnp.int32), tap_layers=taps)
    return np.asarray(model.logits(out.hidden)[0]), [np.asarray(t[0]) for t in out.taps], np.asarray(out.hidden[0])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_and_hidden_states_match_hf(target, hf_model, hf_tokenizer, prompt):
    ids = hf_tokenizer(prompt).input_ids
    assert target.tokenizer.encode(prompt) == ids
    taps = (-1, 0, 5, 11, 16)
    logits, hidden, final = _our_forward(target, ids, taps)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids]), output_hidden_states=True)
    ref_logits = ref.logits[0].numpy()
    np.testing.assert_allclose(logits, ref_logits, atol=2e-3 * np.abs(ref_logits).max(), rtol=0)
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).all()
    for layer, ours in zip(taps, hidden):
        theirs = ref.hidden_states[layer + 1][0].numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-3 * np.abs(theirs).max() + 1e-4, rtol=0,
                                   err_msg=f"layer {layer}")
    np.testing.assert_allclose(final, ref.hidden_states[-1][0].numpy(), atol=2e-3, rtol=1e-3)


def test_32_greedy_tokens_match_hf(target, hf_model, hf_tokenizer):
    from dspark_jax.generation import GenerationConfig, generate_text
    results = generate_text(target, PROMPTS, GenerationConfig(max_new_tokens=32, batch_size=2))
    for prompt, res in zip(PROMPTS, results):
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf_model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        assert res.completion_ids == ref[:len(res.completion_ids)]
        assert res.new_tokens == len(ref)


@pytest.mark.parametrize("algorithm,vocab", [("dspark", 4096), ("dflash", None), ("eagle3", 4096)])
def test_random_drafter_speculative_equals_plain_greedy(target, algorithm, vocab):
    """Greedy identity on the real model with random drafters (batch 2, different prompt lengths)."""
    from dspark_jax.drafters.factory import random_drafter
    from dspark_jax.generation import GenerationConfig, generate_text
    cfg = GenerationConfig(max_new_tokens=12, batch_size=2)
    plain = generate_text(target, PROMPTS, cfg)
    drafter = random_drafter(target, algorithm, gamma=3, num_layers=1 if algorithm != "eagle3" else None,
                             draft_vocab_size=vocab)
    spec = generate_text(target, PROMPTS, cfg, drafter=drafter)
    for p, s in zip(plain, spec):
        assert s.completion_ids == p.completion_ids
        assert s.rounds >= 1 and s.mean_accept_len >= 1.0


def test_shipped_default_drafter_is_lossless_and_accepts(target):
    """The committed DSpark drafter loads for the embedded target, decodes greedily like plain decoding and
    gets drafts accepted on a held-out math prompt."""
    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.drafters.factory import default_drafter
    from dspark_jax.generation import GenerationConfig, generate_text, pooled_accept_length
    from dspark_jax.training.responses import format_prompt
    prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path("gsm8k"))[:2]]
    cfg = GenerationConfig(max_new_tokens=48, batch_size=2)
    drafter = default_drafter(target)
    assert drafter.config.algorithm == "dspark"
    spec = generate_text(target, prompts, cfg, drafter=drafter)
    plain = generate_text(target, prompts, cfg)
    assert [s.completion_ids for s in spec] == [p.completion_ids for p in plain]
    assert pooled_accept_length(spec) > 1.1  # held-out τ of the shipped drafter: BENCHMARKS.md

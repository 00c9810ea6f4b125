"""Tiny random Qwen3 / Gemma3 models created by HF transformers: our logits equal theirs everywhere."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.hf_fixtures import make_tiny_hf_model  # noqa: E402

from dspark_jax.io.hf_checkpoint import load_hf_weights  # noqa: E402
from dspark_jax.io.hf_config import load_hf_config  # noqa: E402
from dspark_jax.models.kv_cache import init_cache  # noqa: E402
from dspark_jax.models.transformer import model_from_canonical  # noqa: E402

SEQ = 24
CASES = [("qwen3", dict(tie=True)), ("qwen3", dict(tie=False)), ("gemma3", dict(sliding_window=8))]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}")
def pair(request, tmp_path_factory):
    family, kwargs = request.param
    torch_model, path = make_tiny_hf_model(family, tmp_path_factory.mktemp(family), **kwargs)
    config = load_hf_config(path)
    model = model_from_canonical(config, load_hf_weights(path, config), jnp.float32)
    return torch_model, model, config


def _tokens(config, batch=2, seq=SEQ, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, size=(batch, seq)).astype(np.int32)


def _hf_logits(torch_model, tokens):
    with torch.no_grad():
        return torch_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def test_full_sequence_logits_match(pair):
    torch_model, model, config = pair
    tokens = _tokens(config)
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = model(jnp.asarray(tokens), pos, init_cache(config, b, t), jnp.zeros((b,), jnp.int32))
    np.testing.assert_allclose(np.asarray(model.logits(out.hidden)), _hf_logits(torch_model, tokens),
                               atol=1e-4, rtol=1e-4)


def test_cached_decoding_logits_match(pair):
    """Prefill a prefix, then feed one token at a time through the KV cache (past the sliding window)."""
    torch_model, model, config = pair
    tokens = _tokens(config, seed=1)
    b, t = tokens.shape
    ref = _hf_logits(torch_model, tokens)
    cache = init_cache(config, b, t)
    split = 5
    pos = jnp.broadcast_to(jnp.arange(split, dtype=jnp.int32), (b, split))
    out = model(jnp.asarray(tokens[:, :split]), pos, cache, jnp.zeros((b,), jnp.int32))
    got = [np.asarray(model.logits(out.hidden))]
    cache = out.cache
    for i in range(split, t):
        pos = jnp.full((b, 1), i, jnp.int32)
        out = model(jnp.asarray(tokens[:, i:i + 1]), pos, cache, pos[:, 0])
        cache = out.cache
        got.append(np.asarray(model.logits(out.hidden)))
    np.testing.assert_allclose(np.concatenate(got, axis=1), ref, atol=1e-4, rtol=1e-4)


def test_hidden_state_taps_match(pair):
    torch_model, model, config = pair
    tokens = _tokens(config, seed=2)
    b, t = tokens.shape
    taps = (-1,) + tuple(range(config.num_layers - 1))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = model(jnp.asarray(tokens), pos, init_cache(config, b, t), jnp.zeros((b,), jnp.int32), tap_layers=taps)
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True).hidden_states
    for layer, ours in zip(taps, out.taps):
        np.testing.assert_allclose(np.asarray(ours), ref[layer + 1].numpy(), atol=1e-4, rtol=1e-4,
                                   err_msg=f"layer {layer}")

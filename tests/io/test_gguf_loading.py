"""GGUF reader and loader: tiny files written with `gguf.GGUFWriter`, error paths, and the default model."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from dspark_jax.io.gguf_file import GGUFError, GGUFFile  # noqa: E402
from dspark_jax.io.gguf_loader import canonical_name, config_from_gguf, load_gguf_weights  # noqa: E402


def write_tiny_qwen3_gguf(path, *, drop=None, hidden=16, raw_types=None):
    """A 1-layer Qwen3 GGUF with random F32 tensors (no tokenizer); `raw_types` stores some quantized instead
    (name → `gguf.GGMLQuantizationType`; the returned tensors are the values before quantization)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_key_length(8)
    w.add_value_length(8)
    w.add_rope_freq_base(1e4)
    w.add_layer_norm_rms_eps(1e-6)
    shapes = {"token_embd.weight": (50, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (16, hidden), "blk.0.attn_k.weight": (8, hidden), "blk.0.attn_v.weight": (8, hidden),
              "blk.0.attn_output.weight": (hidden, 16), "blk.0.attn_q_norm.weight": (8,), "blk.0.attn_k_norm.weight": (8,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.ffn_gate.weight": (32, hidden), "blk.0.ffn_up.weight": (32, hidden), "blk.0.ffn_down.weight": (hidden, 32)}
    tensors = {}
    for name, shape in shapes.items():
        if name == drop:
            continue
        tensors[name] = rng.normal(size=shape).astype(np.float32)
        qtype = (raw_types or {}).get(name, gguf.GGMLQuantizationType.F32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, tensors[name])
        else:
            w.add_tensor(name, gguf.quants.quantize(tensors[name], qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_reads_tiny_qwen3_and_maps_names(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    written = write_tiny_qwen3_gguf(path)
    config, tensors, _ = load_gguf_weights(path)
    assert (config.family, config.num_layers, config.head_dim, config.num_kv_heads) == ("qwen3", 1, 8, 1)
    assert config.tie_word_embeddings
    np.testing.assert_array_equal(tensors["layers.0.self_attn.q_proj.weight"], written["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(tensors["layers.0.post_attention_layernorm.weight"], written["blk.0.ffn_norm.weight"])
    # second load comes from the cache and is identical
    assert list((tmp_path / "cache" / "gguf").glob("*.safetensors"))
    _, cached, _ = load_gguf_weights(path)
    for k in tensors:
        np.testing.assert_array_equal(cached[k], tensors[k])


def test_corrupted_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_qwen3_gguf(path)
    load_gguf_weights(path)
    entry = next((tmp_path / "cache" / "gguf").glob("*.safetensors"))
    entry.write_bytes(b"garbage")
    _, tensors, _ = load_gguf_weights(path)
    assert tensors["embed_tokens.weight"].shape == (50, 16)


def test_missing_file():
    with pytest.raises(GGUFError, match="not found"):
        GGUFFile("/nonexistent/model.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(GGUFError, match="bad magic"):
        GGUFFile(p)


def test_truncated_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_qwen3_gguf(path)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 100])
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(tmp_path / "cut.gguf")
    (tmp_path / "cut2.gguf").write_bytes(data[:40])
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(tmp_path / "cut2.gguf")


def test_missing_tensor(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_qwen3_gguf(path, drop="blk.0.ffn_up.weight")
    with pytest.raises(GGUFError, match="missing tensors.*ffn|up_proj"):
        load_gguf_weights(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="unsupported architecture 'llama'"):
        config_from_gguf(GGUFFile(path))


def test_canonical_names():
    assert canonical_name("blk.3.ffn_norm.weight", "gemma3") == "layers.3.pre_feedforward_layernorm.weight"
    assert canonical_name("blk.3.ffn_norm.weight", "qwen3") == "layers.3.post_attention_layernorm.weight"
    assert canonical_name("token_embd.weight", "gemma3") == "embed_tokens.weight"
    assert canonical_name("rope_freqs.weight", "gemma3") is None


@pytest.mark.slow
def test_default_model_config(default_gguf_path):
    config = config_from_gguf(GGUFFile(default_gguf_path))
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == \
        (18, 640, 4, 1, 256)
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert config.rope_thetas[5] == 1e6 and config.rope_thetas[0] == 1e4
    assert config.sliding_window == 512 and config.vocab_size == 262144


def test_cache_dir_follows_the_environment_and_ignores_an_empty_value(monkeypatch, tmp_path):
    """`$DSPARK_CACHE_DIR` moves the cache; set but empty it falls back to ~/.cache/dspark_jax (an empty path
    would have been the working directory: a GGUF's dequantized weights written into a checkout)."""
    from pathlib import Path
    from dspark_jax.utils.files import cache_dir
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.setenv("DSPARK_CACHE_DIR", "")
    assert cache_dir() == Path.home() / ".cache" / "dspark_jax"
    monkeypatch.delenv("DSPARK_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "dspark_jax"

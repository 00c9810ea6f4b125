"""Hugging Face checkpoint loading: config parsing (both rope layouts), weights, shards, bf16, errors."""
from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from dspark_jax.io.hf_checkpoint import expected_shapes, load_hf_checkpoint, load_hf_weights
from dspark_jax.io.hf_config import CheckpointError, config_from_hf, load_hf_config
from tests.hf_fixtures import (GEMMA3_LAYER_TYPES, GEMMA3_ROPE, QWEN3_ROPE_THETA, make_tiny_gemma3_multimodal,
                         make_tiny_hf_model, text_state_dict)

FULL, SLIDE = "full_attention", "sliding_attention"


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(family, tie) → (torch model, dir); created lazily and shared by the module."""
    cache = {}

    def get(family, tie=True):
        if (family, tie) not in cache:
            out = tmp_path_factory.mktemp(f"{family}_{'tied' if tie else 'untied'}")
            cache[family, tie] = make_tiny_hf_model(family, out, tie=tie)
        return cache[family, tie]

    return get


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_config(model_dir, **changes):
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is _DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(path, "w") as f:
        json.dump(cfg, f)
    return cfg


_DELETE = object()


def _assert_weights_match(weights, model, tie):
    sd = text_state_dict(model)
    expected_names = set(sd) - ({"lm_head.weight"} if tie else set())
    assert set(weights) == expected_names
    for name, array in weights.items():
        assert array.dtype == np.float32, name
        np.testing.assert_array_equal(array, sd[name].float().numpy(), err_msg=name)


# --------------------------------------------------------------------------------------------- config

def test_qwen3_config_as_saved_by_transformers(saved):
    model, d = saved("qwen3")
    raw = json.load(open(os.path.join(d, "config.json")))
    # transformers 5.x writes a flat `rope_parameters` and no top-level rope_theta for Qwen 3
    assert raw["rope_parameters"] == {"rope_type": "default", "rope_theta": QWEN3_ROPE_THETA}
    assert "rope_theta" not in raw
    cfg = load_hf_config(d)
    hf = model.config
    assert cfg.family == "qwen3"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (hf.vocab_size, hf.hidden_size,
                                                                       hf.intermediate_size)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (3, 4, 2, 16)
    assert cfg.layer_types == (FULL,) * 3
    assert cfg.rope_thetas == (QWEN3_ROPE_THETA,) * 3
    assert cfg.rope_scaling_factor == 1.0
    assert cfg.sliding_window is None and cfg.query_pre_attn_scalar is None
    assert cfg.attention_scale == pytest.approx(16 ** -0.5)
    assert cfg.tie_word_embeddings is True
    assert cfg.max_position_embeddings == 256
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, (2,), 0)
    assert cfg.final_logit_softcapping is None
    assert cfg.name == os.path.basename(d)


def test_gemma3_config_as_saved_by_transformers(saved):
    _, d = saved("gemma3")
    raw = json.load(open(os.path.join(d, "config.json")))
    # transformers 5.x keys Gemma 3's `rope_parameters` by layer type
    assert set(raw["rope_parameters"]) == {FULL, SLIDE}
    assert raw["rope_parameters"][SLIDE]["rope_theta"] == GEMMA3_ROPE[SLIDE]
    assert "rope_theta" not in raw and "rope_local_base_freq" not in raw
    cfg = load_hf_config(d)
    assert cfg.family == "gemma3"
    assert cfg.layer_types == GEMMA3_LAYER_TYPES
    assert cfg.rope_thetas == tuple(GEMMA3_ROPE[t] for t in GEMMA3_LAYER_TYPES)
    assert cfg.sliding_window == 8
    assert [cfg.window_of(i) for i in range(4)] == [8, None, 8, None]
    assert cfg.query_pre_attn_scalar == 24
    assert cfg.attention_scale == pytest.approx(24 ** -0.5)
    assert cfg.rope_scaling_factor == 1.0
    assert cfg.tie_word_embeddings is True
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (2, (1,), 0)
    assert cfg.max_position_embeddings == 256


def test_gemma3_linear_rope_scaling_new_layout():
    from tests.hf_fixtures import tiny_config

    hf = tiny_config("gemma3", rope_parameters={
        FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        SLIDE: {"rope_type": "default", "rope_theta": 1e4}}, final_logit_softcapping=30.0)
    raw = hf.to_dict()
    assert raw["rope_parameters"][FULL] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    cfg = config_from_hf(raw)
    assert cfg.rope_scaling_factor == 8.0
    assert cfg.rope_thetas == (1e4, 1e6, 1e4, 1e6)
    assert cfg.final_logit_softcapping == 30.0


LEGACY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 128, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000, "rope_scaling": None, "tie_word_embeddings": True, "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645,
    "attention_bias": False, "torch_dtype": "bfloat16",
}

LEGACY_GEMMA3 = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 128, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
    "query_pre_attn_scalar": 16, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_local_base_freq": 10000,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 512, "sliding_window_pattern": 2,
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": [1, 106],
    "pad_token_id": 0, "torch_dtype": "bfloat16",
}


def test_legacy_qwen3_config(tmp_path):
    cfg = config_from_hf(LEGACY_QWEN3, name="legacy")
    assert cfg.rope_thetas == (1e6, 1e6) and cfg.rope_scaling_factor == 1.0
    assert cfg.tie_word_embeddings is True and cfg.max_position_embeddings == 40960
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (151643, (151645,), 0)
    assert cfg.name == "legacy"
    # transformers reads the same legacy JSON the same way
    from transformers import Qwen3Config

    (tmp_path / "config.json").write_text(json.dumps(LEGACY_QWEN3))
    assert Qwen3Config.from_pretrained(tmp_path).rope_parameters["rope_theta"] == cfg.rope_thetas[0]
    # Qwen 3's HF defaults: untied head, head_dim 128
    minimal = {k: LEGACY_QWEN3[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                             "num_hidden_layers", "num_attention_heads")}
    cfg = config_from_hf(minimal)
    assert cfg.tie_word_embeddings is False and cfg.head_dim == 128 and cfg.num_kv_heads == 4
    assert cfg.rope_thetas == (1e4, 1e4)


def test_legacy_gemma3_config(tmp_path):
    cfg = config_from_hf(LEGACY_GEMMA3)
    assert cfg.layer_types == (SLIDE, FULL, SLIDE, FULL)
    assert cfg.rope_thetas == (1e4, 1e6, 1e4, 1e6)
    assert cfg.rope_scaling_factor == 8.0
    assert cfg.sliding_window == 512 and cfg.query_pre_attn_scalar == 16
    assert cfg.eos_token_ids == (1, 106) and cfg.bos_token_id == 2
    assert cfg.tie_word_embeddings is True  # Gemma default
    from transformers import Gemma3TextConfig

    (tmp_path / "config.json").write_text(json.dumps(LEGACY_GEMMA3))
    hf = Gemma3TextConfig.from_pretrained(tmp_path)
    assert tuple(hf.layer_types) == cfg.layer_types
    assert hf.rope_parameters[FULL] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert hf.rope_parameters[SLIDE]["rope_theta"] == 1e4
    # no layer_types and no pattern: every 6th layer is global
    legacy = {k: v for k, v in LEGACY_GEMMA3.items() if k != "sliding_window_pattern"}
    legacy["num_hidden_layers"] = 7
    cfg = config_from_hf(legacy)
    assert cfg.layer_types == (SLIDE,) * 5 + (FULL, SLIDE)


def test_generation_config_adds_eos(saved, tmp_path):
    _, d = saved("qwen3")
    d = _copy(d, tmp_path)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2], "pad_token_id": 7}))
    cfg = load_hf_config(d)
    assert cfg.eos_token_ids == (2, 5)
    assert cfg.pad_token_id == 0  # config.json's pad wins
    raw = dict(LEGACY_QWEN3)
    cfg = config_from_hf(raw, generation_config={"eos_token_id": [151645, 151643], "pad_token_id": 151643})
    assert cfg.eos_token_ids == (151645, 151643) and cfg.pad_token_id == 151643


def test_expected_shapes_counts():
    q = config_from_hf(LEGACY_QWEN3)
    shapes = expected_shapes(q)
    assert len(shapes) == 1 + 2 * 11 + 1  # tied: no lm_head
    assert shapes["layers.1.self_attn.k_proj.weight"] == (32, 64)
    assert shapes["layers.0.self_attn.o_proj.weight"] == (64, 64)
    assert shapes["layers.0.mlp.down_proj.weight"] == (64, 128)
    g = config_from_hf({**LEGACY_GEMMA3, "tie_word_embeddings": False})
    shapes = expected_shapes(g)
    assert len(shapes) == 1 + 4 * 13 + 1 + 1
    assert shapes["lm_head.weight"] == (128, 64)
    assert shapes["layers.3.pre_feedforward_layernorm.weight"] == (64,)


# -------------------------------------------------------------------------------------------- weights

@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
@pytest.mark.parametrize("tie", [True, False])
def test_weights_equal_torch_state_dict(saved, family, tie):
    model, d = saved(family, tie)
    cfg, weights = load_hf_checkpoint(d)
    assert cfg.tie_word_embeddings is tie
    assert {k: v.shape for k, v in weights.items()} == expected_shapes(cfg)
    _assert_weights_match(weights, model, tie)
    assert ("lm_head.weight" in weights) is (not tie)


def test_stored_head_dropped_when_config_ties(saved, tmp_path):
    model, d = saved("qwen3", False)
    d = _copy(d, tmp_path)
    _edit_config(d, tie_word_embeddings=True)
    weights = load_hf_weights(d, load_hf_config(d))
    assert "lm_head.weight" not in weights
    np.testing.assert_array_equal(weights["embed_tokens.weight"], model.model.embed_tokens.weight.detach().numpy())


def test_sharded_checkpoint_loads_identically(saved, tmp_path):
    model, d = saved("gemma3")
    _, sharded = make_tiny_hf_model("gemma3", tmp_path / "sharded", max_shard_size="150KB")
    shards = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(sharded)
    reference = load_hf_weights(d, load_hf_config(d))
    weights = load_hf_weights(sharded, load_hf_config(sharded))
    assert weights.keys() == reference.keys()
    for k in reference:
        np.testing.assert_array_equal(weights[k], reference[k], err_msg=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint(saved, tmp_path, dtype):
    model, _ = saved("gemma3")
    half = copy.deepcopy(model).to(dtype)
    half.save_pretrained(tmp_path / "half", safe_serialization=True)
    cfg, weights = load_hf_checkpoint(tmp_path / "half")
    sd = text_state_dict(half)
    assert all(t.dtype == dtype for t in sd.values())
    for name, array in weights.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, sd[name].float().numpy(), err_msg=name)


def test_gemma3_multimodal_wrapper(tmp_path):
    model, d = make_tiny_gemma3_multimodal(tmp_path / "mm")
    cfg, weights = load_hf_checkpoint(d)
    assert cfg.family == "gemma3" and cfg.eos_token_ids == (1, 106)
    assert cfg.layer_types == GEMMA3_LAYER_TYPES
    assert cfg.rope_thetas == tuple(GEMMA3_ROPE[t] for t in GEMMA3_LAYER_TYPES)
    assert not any("vision" in k or "projector" in k for k in weights)
    _assert_weights_match(weights, model, tie=True)


# --------------------------------------------------------------------------------------------- errors

def test_missing_config_json(saved, tmp_path):
    _, d = saved("qwen3")
    d = _copy(d, tmp_path)
    os.remove(d / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json.*not found"):
        load_hf_config(d)
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_hf_config(tmp_path / "nowhere")


def test_missing_required_key(saved, tmp_path):
    _, d = saved("qwen3")
    d = _copy(d, tmp_path)
    _edit_config(d, hidden_size=_DELETE)
    with pytest.raises(CheckpointError, match=r"config\.json.*'hidden_size' is missing"):
        load_hf_config(d)
    with pytest.raises(CheckpointError, match=r"'num_hidden_layers' must be int"):
        config_from_hf({**LEGACY_QWEN3, "num_hidden_layers": "2"}, name="x.json")


@pytest.mark.parametrize("model_type", ["llama", "siglip_vision_model", None])
def test_unsupported_model_type(model_type):
    with pytest.raises(CheckpointError, match=r"my/config\.json: unsupported model_type.*qwen3, gemma3_text, gemma3"):
        config_from_hf({**LEGACY_QWEN3, "model_type": model_type}, name="my/config.json")


@pytest.mark.parametrize("change, message", [
    ({"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window=true is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE type 'yarn'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"num_key_value_heads": 3}, "invalid config: num_heads"),
])
def test_unsupported_qwen3_features(change, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf({**LEGACY_QWEN3, **change}, name="c.json")


def test_gemma3_config_errors():
    with pytest.raises(CheckpointError, match="layer_types must list num_hidden_layers"):
        config_from_hf({**LEGACY_GEMMA3, "layer_types": [SLIDE, FULL]})
    with pytest.raises(CheckpointError, match="unknown layer types"):
        config_from_hf({**LEGACY_GEMMA3, "layer_types": [SLIDE, FULL, "chunked_attention", FULL]})
    with pytest.raises(CheckpointError, match="needs a 'text_config'"):
        config_from_hf({"model_type": "gemma3"})
    with pytest.raises(CheckpointError, match="sliding_window"):
        config_from_hf({**LEGACY_GEMMA3, "sliding_window": None})
    with pytest.raises(CheckpointError, match="keyed by layer type"):
        config_from_hf({**LEGACY_GEMMA3, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})


def test_missing_safetensors(saved, tmp_path):
    _, d = saved("qwen3")
    d = _copy(d, tmp_path)
    os.remove(d / "model.safetensors")
    cfg = load_hf_config(d)
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_hf_weights(d, cfg)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_hf_weights(d, cfg)


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_safetensors(saved, tmp_path, keep):
    _, d = saved("qwen3")
    d = _copy(d, tmp_path)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_hf_weights(d, load_hf_config(d))


def test_corrupted_header(saved, tmp_path):
    _, d = saved("qwen3")
    d = _copy(d, tmp_path)
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupted safetensors header"):
        load_hf_weights(d, load_hf_config(d))


def test_shape_mismatch(saved, tmp_path):
    _, d = saved("gemma3")
    d = _copy(d, tmp_path)
    _edit_config(d, hidden_size=32)
    with pytest.raises(CheckpointError) as info:
        load_hf_weights(d, load_hf_config(d))
    msg = str(info.value)
    assert "model.safetensors" in msg and "wrong shape" in msg
    assert "embed_tokens.weight expected (128, 32) got (128, 64)" in msg
    assert "... and" in msg  # long lists are capped


def test_missing_and_unexpected_tensors(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, d = saved("qwen3")
    d = _copy(d, tmp_path)
    path = str(d / "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    tensors["model.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignored buffer
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as info:
        load_hf_weights(d, load_hf_config(d))
    msg = str(info.value)
    assert "1 missing tensor(s): layers.1.mlp.up_proj.weight" in msg
    assert "1 unexpected tensor(s): layers.0.self_attn.q_proj.bias" in msg


def test_untied_config_without_head(saved, tmp_path):
    _, d = saved("gemma3")
    d = _copy(d, tmp_path)
    _edit_config(d, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="missing tensor.*lm_head.weight"):
        load_hf_weights(d, load_hf_config(d))


def test_missing_shard(tmp_path):
    _, d = make_tiny_hf_model("qwen3", tmp_path / "sharded", max_shard_size="150KB")
    shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    assert len(shards) > 2
    os.remove(os.path.join(d, shards[1]))
    cfg = load_hf_config(d)
    with pytest.raises(CheckpointError, match=rf"index\.json: shard file\(s\).*missing.*{shards[1]}"):
        load_hf_weights(d, cfg)
    # a shard that lost a tensor the index places in it
    _, d2 = make_tiny_hf_model("qwen3", tmp_path / "sharded2", max_shard_size="150KB")
    index = json.load(open(os.path.join(d2, "model.safetensors.index.json")))
    name, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    index["weight_map"][name] = other
    json.dump(index, open(os.path.join(d2, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match=rf"{other}: tensors that .* places in this shard are not in it: {name}"):
        load_hf_weights(d2, cfg)


def test_gemma3_wrapper_with_sparse_text_config(tmp_path):
    """Hub `gemma3` configs (e.g. gemma-3-4b) store only non-default text fields; HF defaults fill in."""
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
           "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                           "num_hidden_layers": 34, "sliding_window": 1024,
                           "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152}}
    cfg = config_from_hf(raw)
    from transformers import Gemma3Config

    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = Gemma3Config.from_pretrained(tmp_path).text_config
    assert (cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hf.vocab_size, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert cfg.layer_types == tuple(hf.layer_types)
    assert cfg.rope_thetas == tuple(hf.rope_parameters[t]["rope_theta"] for t in hf.layer_types)
    assert cfg.rope_scaling_factor == hf.rope_parameters[FULL]["factor"] == 8.0
    assert (cfg.query_pre_attn_scalar, cfg.max_position_embeddings) == (hf.query_pre_attn_scalar,
                                                                         hf.max_position_embeddings)
    assert cfg.sliding_window == 1024 and cfg.eos_token_ids == (1, 106) and cfg.bos_token_id == 2
    assert cfg.tie_word_embeddings is True


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_models_are_built_tensor_by_tensor_from_the_lazy_reader(saved, dtype):
    """`load_target`'s path: the validated checkpoint read lazily, each tensor cast on the host and placed; the same
    parameters as building from the eager float32 dict."""
    import chex
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dspark_jax.io.hf_checkpoint import SafetensorsReader, open_hf_weights
    from dspark_jax.models.transformer import model_from_canonical
    _, d = saved("qwen3", tie=False)
    config = load_hf_config(d)
    reader = open_hf_weights(d, config)
    assert isinstance(reader, SafetensorsReader) and sorted(reader) == sorted(expected_shapes(config))
    lazy = nnx.state(model_from_canonical(config, reader, getattr(jnp, dtype)))
    eager = nnx.state(model_from_canonical(config, load_hf_weights(d, config), getattr(jnp, dtype)))
    chex.assert_trees_all_equal(lazy, eager)
    chex.assert_trees_all_equal_dtypes(lazy, jax.tree.map(lambda a: a.astype(dtype), lazy))

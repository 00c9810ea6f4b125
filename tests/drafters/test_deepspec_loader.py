"""Loading DeepSpec DSpark / DFlash drafter checkpoints (synthetic ones, written here in DeepSpec's
names and torch layouts) into DSparkDrafter: exact parameters, forward semantics against a numpy
reference computed from the raw torch-layout tensors, lossless greedy speculative decoding, errors."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from dspark_jax.testing.tiny_configs import tiny_gemma3, tiny_qwen3
from dspark_jax.decoding.autoregressive import generate, prefill
from dspark_jax.sampling import FilterMode, SamplingParams
from dspark_jax.decoding.speculative import speculative_generate
from dspark_jax.drafters.deepspec import (DrafterMismatchError, drafter_config_from_deepspec, load_deepspec_config,
                                    load_deepspec_drafter)
from dspark_jax.io.hf_checkpoint import expected_shapes
from dspark_jax.io.hf_config import CheckpointError
from dspark_jax.models.transformer import model_from_canonical

TARGET = tiny_qwen3(num_layers=6)  # vocab 97, d 32, MLP 64, 4 heads / 1 KV head, head_dim 8, untied
V, D, R, G = TARGET.vocab_size, TARGET.hidden_size, 8, 4
IDS = [1, 2, 3]
DRAFT_LAYERS = 2
MASK = 96
VARIANTS = {  # name -> (markov_rank, markov_head_type, confidence head, confidence_head_with_markov)
    "vanilla": (R, "vanilla", True, True),
    "gated": (R, "gated", True, True),
    "rnn": (R, "rnn", True, True),
    "conf_hidden_only": (R, "vanilla", True, False),
    "dflash": (0, None, False, None),
}


def _rand(rng, shape, std=0.2):
    return (std * rng.standard_normal(shape)).astype(np.float32)


def _norm(rng, n):
    return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def target_tensors():
    """Canonical (torch-layout) target weights, larger than the default init so greedy argmaxes have
    clear margins."""
    rng = np.random.default_rng(0)
    return {n: (_norm(rng, s) if n.endswith("norm.weight") else _rand(rng, s, 0.3))
            for n, s in expected_shapes(TARGET).items()}


@pytest.fixture(scope="module")
def target_model(target_tensors):
    return model_from_canonical(TARGET, target_tensors)


def _heads(variant):
    """A VARIANTS name or an explicit (markov_rank, markov_head_type, confidence, with_markov) tuple."""
    return VARIANTS[variant] if isinstance(variant, str) else variant


def deepspec_config(variant="vanilla", **overrides):
    rank, kind, conf, with_markov = _heads(variant)
    cfg = {
        "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "hidden_size": D, "intermediate_size": 64,
        "num_hidden_layers": DRAFT_LAYERS, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
        "vocab_size": V, "rms_norm_eps": 1e-6, "rope_theta": 1e4, "max_position_embeddings": 512,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "layer_types": ["full_attention"] * DRAFT_LAYERS, "use_sliding_window": False,
        "block_size": G, "mask_token_id": MASK, "target_layer_ids": IDS, "num_target_layers": 6,
        "num_anchors": 512, "markov_rank": rank, "enable_confidence_head": conf,
    }
    if rank:
        cfg["markov_head_type"] = kind
    if conf:
        cfg["confidence_head_with_markov"] = with_markov
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def deepspec_tensors(variant, target_tensors, seed=1):
    """Every tensor of a DeepSpec drafter checkpoint, DeepSpec names, torch [out, in] layouts."""
    rank, kind, conf, with_markov = _heads(variant)
    rng = np.random.default_rng(seed)
    hd, q, kv, f = 8, 32, 8, 64
    t = {"embed_tokens.weight": target_tensors["embed_tokens.weight"],
         "lm_head.weight": target_tensors["lm_head.weight"],
         "fc.weight": _rand(rng, (D, len(IDS) * D)), "hidden_norm.weight": _norm(rng, D),
         "norm.weight": _norm(rng, D)}
    for i in range(DRAFT_LAYERS):
        p = f"layers.{i}."
        t.update({p + "input_layernorm.weight": _norm(rng, D), p + "post_attention_layernorm.weight": _norm(rng, D),
                  p + "self_attn.q_proj.weight": _rand(rng, (q, D)), p + "self_attn.k_proj.weight": _rand(rng, (kv, D)),
                  p + "self_attn.v_proj.weight": _rand(rng, (kv, D)), p + "self_attn.o_proj.weight": _rand(rng, (D, q)),
                  p + "self_attn.q_norm.weight": _norm(rng, hd), p + "self_attn.k_norm.weight": _norm(rng, hd),
                  p + "mlp.gate_proj.weight": _rand(rng, (f, D)), p + "mlp.up_proj.weight": _rand(rng, (f, D)),
                  p + "mlp.down_proj.weight": _rand(rng, (D, f))})
    if rank:
        t["markov_head.markov_w1.weight"] = _rand(rng, (V, rank), 1.0)
        t["markov_head.markov_w2.weight"] = _rand(rng, (V, rank), 1.0)
        if kind == "gated":
            t["markov_head.gate_proj.weight"] = _rand(rng, (rank, D + rank), 0.5)
            t["markov_head.gate_proj.bias"] = _rand(rng, (rank,), 0.5)
        if kind == "rnn":
            t["markov_head.joint_proj.weight"] = _rand(rng, (3 * rank, 2 * rank + D), 0.5)
            t["markov_head.joint_proj.bias"] = _rand(rng, (3 * rank,), 0.5)
    if conf:
        t["confidence_head.proj.weight"] = _rand(rng, (1, D + (rank if with_markov else 0)), 0.5)
        t["confidence_head.proj.bias"] = _rand(rng, (1,), 0.5)
    return t


def write_checkpoint(path, config, tensors, shards=1):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n] for n in names}, os.path.join(path, "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, os.path.join(path, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, target_tensors):
    """variant -> (directory, tensors), written once per module."""
    root = tmp_path_factory.mktemp("deepspec")
    out = {}
    for variant in VARIANTS:
        tensors = deepspec_tensors(variant, target_tensors)
        out[variant] = (write_checkpoint(str(root / variant), deepspec_config(variant), tensors), tensors)
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


# --------------------------------------------------------------------------------------------- config

def test_config_mapping():
    c = drafter_config_from_deepspec(deepspec_config("rnn"), TARGET)
    assert (c.algorithm, c.target_layer_ids, c.block_size, c.num_layers, c.mask_token_id) == \
        ("dspark", tuple(IDS), G, DRAFT_LAYERS, MASK)
    assert (c.markov_rank, c.markov_head_type, c.confidence_head, c.confidence_with_markov) == (R, "rnn", True, True)
    assert c.draft_vocab_size is None
    d = drafter_config_from_deepspec(deepspec_config("dflash"), TARGET)
    assert (d.algorithm, d.markov_rank, d.confidence_head) == ("dflash", 0, False)
    h = drafter_config_from_deepspec(deepspec_config("conf_hidden_only"), TARGET)
    assert h.confidence_head and not h.uses_confidence_markov_input
    # a Markov head without a confidence head is still DSpark; alpha spelling of the training config
    m = drafter_config_from_deepspec(deepspec_config("vanilla", enable_confidence_head=None,
                                                     confidence_head_alpha=0.0), TARGET)
    assert (m.algorithm, m.confidence_head) == ("dspark", False)


# ------------------------------------------------------------------------------------------ parameters

def _expected_pure(variant, t):
    """Our drafter's parameters as they must come out of the DeepSpec tensors (written out by hand)."""
    rank, kind, conf, _ = VARIANTS[variant]
    exp = {"fc": t["fc.weight"].T, "hidden_norm": {"weight": t["hidden_norm.weight"]},
           "norm": {"weight": t["norm.weight"]}, "layers": {}}
    for i in range(DRAFT_LAYERS):
        p = f"layers.{i}."
        exp["layers"][i] = {
            "input_layernorm": {"weight": t[p + "input_layernorm.weight"]},
            "post_attention_layernorm": {"weight": t[p + "post_attention_layernorm.weight"]},
            "self_attn": {n: t[f"{p}self_attn.{n}.weight"].T for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
            | {n: {"weight": t[f"{p}self_attn.{n}.weight"]} for n in ("q_norm", "k_norm")},
            "mlp": {n: t[f"{p}mlp.{n}.weight"].T for n in ("gate_proj", "up_proj", "down_proj")}}
    if rank:
        exp["markov"] = {"w1": t["markov_head.markov_w1.weight"], "w2": t["markov_head.markov_w2.weight"].T}
        if kind == "gated":
            exp["markov"] |= {"gate_w": t["markov_head.gate_proj.weight"].T, "gate_b": t["markov_head.gate_proj.bias"]}
        if kind == "rnn":
            exp["markov"] |= {"joint_w": t["markov_head.joint_proj.weight"].T,
                              "joint_b": t["markov_head.joint_proj.bias"]}
    if conf:
        exp["confidence"] = {"w": t["confidence_head.proj.weight"][0], "b": t["confidence_head.proj.bias"][0]}
    return exp


def _assert_params(drafter, variant, tensors, rtol=0.0):
    got = nnx.to_pure_dict(nnx.state(drafter, nnx.Param))
    exp = _expected_pure(variant, tensors)
    assert jax.tree.structure(got) == jax.tree.structure(exp)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(np.asarray(g, np.float32), e, rtol=rtol, atol=0), got, exp)
    ident = np.arange(V)
    np.testing.assert_array_equal(drafter.draft_to_target[...], ident)
    np.testing.assert_array_equal(drafter.target_to_draft[...], ident)
    if drafter.confidence is not None:
        np.testing.assert_array_equal(drafter.confidence.temperatures[...], np.ones(G))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameters_equal_tensors(checkpoints, variant):
    path, tensors = checkpoints[variant]
    drafter = load_deepspec_drafter(path, TARGET)
    assert drafter.config == load_deepspec_config(path, TARGET)
    _assert_params(drafter, variant, tensors)


def test_sharded_checkpoint(tmp_path, checkpoints):
    _, tensors = checkpoints["gated"]
    path = write_checkpoint(str(tmp_path / "sharded"), deepspec_config("gated"), tensors, shards=3)
    _assert_params(load_deepspec_drafter(path, TARGET), "gated", tensors)


def test_bfloat16_checkpoint(tmp_path, checkpoints):
    import torch
    from safetensors.torch import save_file as save_torch

    _, tensors = checkpoints["rnn"]
    path = str(tmp_path / "bf16")
    write_checkpoint(path, deepspec_config("rnn"), {})
    bf16 = {n: torch.from_numpy(a).to(torch.bfloat16) for n, a in tensors.items()}
    save_torch(bf16, os.path.join(path, "model.safetensors"))
    rounded = {n: b.float().numpy() for n, b in bf16.items()}
    drafter = load_deepspec_drafter(path, TARGET, dtype=jnp.bfloat16)
    assert drafter.fc[...].dtype == jnp.bfloat16
    _assert_params(drafter, "rnn", rounded)


def test_frozen_copies_compared_with_target(tmp_path, checkpoints, target_model):
    path, tensors = checkpoints["vanilla"]
    load_deepspec_drafter(path, TARGET, target_model=target_model)  # copies equal the target's
    other = dict(tensors, **{"lm_head.weight": tensors["lm_head.weight"] + 0.05})
    bad = write_checkpoint(str(tmp_path / "other"), deepspec_config("vanilla"), other)
    with pytest.raises(DrafterMismatchError, match="lm_head.weight differs from the target's output head"):
        load_deepspec_drafter(bad, TARGET, target_model=target_model)
    load_deepspec_drafter(bad, TARGET)  # without a target model only shapes are checked


# --------------------------------------------------------------------------------------------- forward

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _reference_heads(variant, t, hidden, anchor):
    """Greedy left-to-right Markov sampling and confidence logits from the torch-layout tensors (numpy)."""
    rank, kind, conf, with_markov = VARIANTS[variant]
    base = hidden @ t["lm_head.weight"].T  # [B, G, V]
    b = hidden.shape[0]
    prev, state = anchor, np.zeros((b, rank), np.float32)
    toks, zs = [], []
    for k in range(G):
        h, logits = hidden[:, k], base[:, k]
        if rank:
            e = t["markov_head.markov_w1.weight"][prev]
            if kind == "vanilla":
                z = e
            elif kind == "gated":
                g = _sigmoid(np.concatenate([h, e], -1) @ t["markov_head.gate_proj.weight"].T
                             + t["markov_head.gate_proj.bias"])
                z = g * e
            else:
                j = np.concatenate([state, e, h], -1) @ t["markov_head.joint_proj.weight"].T \
                    + t["markov_head.joint_proj.bias"]
                gate, cand, out = np.split(j, 3, -1)
                state = _sigmoid(gate) * state + (1 - _sigmoid(gate)) * np.tanh(cand)
                z = np.tanh(out)
            logits = logits + z @ t["markov_head.markov_w2.weight"].T
        if conf:
            feat = np.concatenate([h, t["markov_head.markov_w1.weight"][prev]], -1) if with_markov else h
            zs.append(feat @ t["confidence_head.proj.weight"][0] + t["confidence_head.proj.bias"][0])
        else:
            zs.append(np.zeros(b, np.float32))
        prev = logits.argmax(-1)
        toks.append(prev)
    return np.stack(toks, 1), np.stack(zs, 1)


@pytest.mark.parametrize("variant", ["vanilla", "gated", "rnn", "conf_hidden_only", "dflash"])
def test_propose_matches_reference(checkpoints, target_model, variant):
    path, tensors = checkpoints[variant]
    drafter = load_deepspec_drafter(path, TARGET)
    prompts = jnp.asarray([[3, 14, 15, 92, 65, 35], [89, 79, 32, 0, 0, 0]], jnp.int32)
    lens = jnp.asarray([6, 3], jnp.int32)
    _, out = prefill(target_model, prompts, lens, 16, tap_layers=tuple(IDS))
    state = drafter.prefill(target_model, drafter.init_state(2, 16), jnp.concatenate(out.taps, -1), prompts, lens)
    anchor = jnp.asarray([7, 11], jnp.int32)
    params, mode = SamplingParams.create(2), FilterMode()
    prop = drafter.propose(target_model, state, anchor, lens, jax.random.key(0), params, mode,
                           drafter.head_matrix(target_model))
    assert prop.tokens.shape == (2, G) and prop.p_draft.shape == (2, G, V)
    np.testing.assert_array_equal(np.asarray(prop.p_draft).argmax(-1), np.asarray(prop.tokens))
    np.testing.assert_allclose(np.asarray(prop.p_draft).max(-1), 1.0)
    hidden = np.asarray(drafter.backbone(target_model, anchor, lens, state))
    toks, zs = _reference_heads(variant, tensors, hidden, np.asarray(anchor))
    np.testing.assert_array_equal(np.asarray(prop.tokens), toks)
    np.testing.assert_allclose(np.asarray(prop.confidence_logits), zs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["rnn", "dflash"])
def test_greedy_speculative_equals_autoregressive(checkpoints, target_model, variant):
    drafter = load_deepspec_drafter(checkpoints[variant][0], TARGET)
    tg, ts = nnx.split(target_model)
    dg, ds = nnx.split(drafter)
    prompts = jnp.asarray([[3, 14, 15, 92, 65, 35, 8], [89, 79, 32, 0, 0, 0, 0]], jnp.int32)
    lens = jnp.asarray([7, 3], jnp.int32)
    params, key, n = SamplingParams.create(2), jax.random.key(5), 14
    ref = generate(tg, ts, prompts, lens, key, params, max_new_tokens=n, stop_ids=())
    spec = speculative_generate(tg, ts, dg, ds, prompts, lens, key, params, jnp.float32(0.0),
                                max_new_tokens=n, stop_ids=())
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(spec.num_tokens), [n, n])


def test_accepting_drafter_equals_autoregressive(tmp_path, target_tensors):
    """A target that is a bigram model (attention and MLP outputs zeroed) and a drafter whose Markov head
    (rank V) encodes that bigram table: every draft is accepted, so whole blocks plus bonus tokens are
    committed each round, and the output still equals plain greedy decoding."""
    t = dict(target_tensors)
    for i in range(TARGET.num_layers):
        t[f"layers.{i}.self_attn.o_proj.weight"] = np.zeros_like(t[f"layers.{i}.self_attn.o_proj.weight"])
        t[f"layers.{i}.mlp.down_proj.weight"] = np.zeros_like(t[f"layers.{i}.mlp.down_proj.weight"])
    target = model_from_canonical(TARGET, t)
    e = t["embed_tokens.weight"]
    normed = e / np.sqrt((e * e).mean(-1, keepdims=True) + TARGET.rms_norm_eps) * t["norm.weight"]
    bigram = (normed @ t["lm_head.weight"].T).argmax(-1)  # greedy next token after each token
    oracle = (V, "vanilla", True, True)
    tensors = deepspec_tensors(oracle, t)
    tensors["markov_head.markov_w1.weight"] = np.eye(V, dtype=np.float32)
    w2 = np.zeros((V, V), np.float32)
    w2[bigram, np.arange(V)] = 1e3  # bias(prev) = W2 W1[prev] peaks at bigram[prev]
    tensors["markov_head.markov_w2.weight"] = w2
    path = write_checkpoint(str(tmp_path / "oracle"), deepspec_config(oracle), tensors)
    drafter = load_deepspec_drafter(path, TARGET, target_model=target)
    tg, ts = nnx.split(target)
    dg, ds = nnx.split(drafter)
    prompts = jnp.asarray([[3, 14, 15, 92, 65, 35, 8], [89, 79, 32, 0, 0, 0, 0]], jnp.int32)
    lens = jnp.asarray([7, 3], jnp.int32)
    params, key, n = SamplingParams.create(2), jax.random.key(5), 14
    ref = generate(tg, ts, prompts, lens, key, params, max_new_tokens=n, stop_ids=())
    spec = speculative_generate(tg, ts, dg, ds, prompts, lens, key, params, jnp.float32(0.0),
                                max_new_tokens=n, stop_ids=())
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(ref.tokens))
    # 1 token from the prefill, then rounds of G accepted drafts + 1 bonus: 5 + 5 + 3
    np.testing.assert_array_equal(np.asarray(spec.rounds), [3, 3])
    np.testing.assert_array_equal(np.asarray(spec.committed[:, :3]), [[G + 1, G + 1, 3]] * 2)


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("override, error, message", [
    ({"hidden_size": 48}, DrafterMismatchError, "drafter hidden_size is 48, but the target tiny-qwen3 has 32"),
    ({"num_key_value_heads": 2}, DrafterMismatchError, "num_key_value_heads is 2"),
    ({"head_dim": 16}, DrafterMismatchError, "head_dim is 16"),
    ({"intermediate_size": 128}, DrafterMismatchError, "intermediate_size is 128"),
    ({"vocab_size": 151936}, DrafterMismatchError, "vocab_size is 151936, but the target tiny-qwen3 has 97"),
    ({"rope_theta": 1e6}, DrafterMismatchError, "RoPE base"),
    ({"num_target_layers": 36}, DrafterMismatchError, "num_target_layers is 36, but the target tiny-qwen3 has 6"),
    ({"target_layer_ids": [1, 2, 5]}, DrafterMismatchError, r"include \[5\], out of range for the target's 6 layers"),
    ({"target_layer_ids": [-2, 1]}, DrafterMismatchError, r"include \[-2\]"),
    ({"target_layer_ids": [3, 1]}, CheckpointError, "strictly increasing"),
    ({"mask_token_id": 151669}, DrafterMismatchError, "mask_token_id is 151669"),
    ({"markov_head_type": "lstm"}, CheckpointError, "unsupported markov_head_type 'lstm'"),
    ({"block_size": None}, CheckpointError, "required key 'block_size' is missing"),
    ({"architectures": ["Qwen3Eagle3Model"]}, CheckpointError, "not a DeepSpec DSpark/DFlash drafter.*Eagle3"),
    ({"architectures": ["Gemma4DSparkModel"]}, DrafterMismatchError, "Gemma 4 drafters are not supported"),
])
def test_config_errors(override, error, message):
    with pytest.raises(error, match=message):
        drafter_config_from_deepspec(deepspec_config("vanilla", **override), TARGET)


def test_gemma_target_rejected(checkpoints):
    with pytest.raises(DrafterMismatchError, match="Gemma 4 drafters are not supported"):
        load_deepspec_drafter(checkpoints["vanilla"][0], tiny_gemma3(num_layers=6))


def test_wrong_hidden_size_checkpoint(tmp_path, checkpoints):
    path = _copy(checkpoints["vanilla"][0], tmp_path / "ckpt")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(deepspec_config("vanilla", hidden_size=64, head_dim=16), f)
    with pytest.raises(DrafterMismatchError, match="hidden_size is 64"):
        load_deepspec_drafter(path, TARGET)


@pytest.mark.parametrize("name, shape, message", [
    ("markov_head.markov_w1.weight", (98, R), r"vocabulary mismatch: 98 rows, the target vocabulary has 97"),
    ("embed_tokens.weight", (98, D), r"embed_tokens.weight expected \(97, 32\) got \(98, 32\) \(vocabulary"),
    ("lm_head.weight", (V, 16), r"lm_head.weight expected \(97, 32\) got \(97, 16\)"),
    ("fc.weight", (D, 2 * D), r"fc.weight expected \(32, 96\) got \(32, 64\)"),
])
def test_tensor_shape_mismatch(tmp_path, checkpoints, name, shape, message):
    _, tensors = checkpoints["vanilla"]
    bad = dict(tensors, **{name: np.zeros(shape, np.float32)})
    path = write_checkpoint(str(tmp_path / "bad"), deepspec_config("vanilla"), bad)
    with pytest.raises(DrafterMismatchError, match=message):
        load_deepspec_drafter(path, TARGET)


def test_missing_and_unexpected_tensors(tmp_path, checkpoints):
    _, tensors = checkpoints["vanilla"]
    t = {n: a for n, a in tensors.items() if n not in ("fc.weight", "layers.1.mlp.up_proj.weight")}
    path = write_checkpoint(str(tmp_path / "missing"), deepspec_config("vanilla"), t)
    with pytest.raises(CheckpointError, match=r"2 missing tensor\(s\): fc.weight; layers.1.mlp.up_proj.weight"):
        load_deepspec_drafter(path, TARGET)
    # Markov tensors in a checkpoint whose config says DFlash: the config does not describe the weights
    path = write_checkpoint(str(tmp_path / "unexpected"), deepspec_config("dflash"), tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): confidence_head.proj.bias"):
        load_deepspec_drafter(path, TARGET)
    # frozen copies are optional
    t = {n: a for n, a in tensors.items() if n not in ("embed_tokens.weight", "lm_head.weight")}
    load_deepspec_drafter(write_checkpoint(str(tmp_path / "nocopies"), deepspec_config("vanilla"), t), TARGET)


@pytest.mark.parametrize("keep", [5, 200, -100])
def test_truncated_file(tmp_path, checkpoints, keep):
    path = _copy(checkpoints["vanilla"][0], tmp_path / "ckpt")
    st = os.path.join(path, "model.safetensors")
    with open(st, "rb") as f:
        data = f.read()
    with open(st, "wb") as f:
        f.write(data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_deepspec_drafter(path, TARGET)


def test_missing_files(tmp_path, checkpoints):
    with pytest.raises(CheckpointError, match="drafter directory not found"):
        load_deepspec_drafter(str(tmp_path / "nope"), TARGET)
    path = _copy(checkpoints["vanilla"][0], tmp_path / "ckpt")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_deepspec_drafter(path, TARGET)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        load_deepspec_drafter(path, TARGET)


def test_corrupted_config_and_missing_shard(tmp_path, checkpoints):
    _, tensors = checkpoints["vanilla"]
    path = write_checkpoint(str(tmp_path / "sharded"), deepspec_config("vanilla"), tensors, shards=2)
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="shard file.*missing"):
        load_deepspec_drafter(path, TARGET)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_deepspec_drafter(path, TARGET)

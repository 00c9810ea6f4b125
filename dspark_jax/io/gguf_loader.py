"""Target weights from a GGUF file (Gemma 3 or Qwen 3): config, canonical tensors, dequantization cache.

Dequantizing the default 270M model takes a few seconds; the float32 result is cached as one
safetensors file under the user cache directory (`$DSPARK_CACHE_DIR`, default ~/.cache/dspark_jax),
keyed by the GGUF's path, size and mtime, so later starts only memory-map it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors.numpy import save_file

from dspark_jax.io.gguf_file import GGUFError, GGUFFile
from dspark_jax.io.hf_checkpoint import SafetensorsReader, expected_shapes, safetensors_entries
from dspark_jax.io.hf_config import CheckpointError
from dspark_jax.models.config import (TransformerConfig, gemma3_layer_types, gemma3_rope_thetas)
from dspark_jax.utils.files import cache_dir

CACHE_FORMAT_VERSION = 1
SUPPORTED_GGUF_ARCHITECTURES = ("gemma3", "qwen3")

_LAYER_RENAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_RENAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                   "output.weight": "lm_head.weight"}


def config_from_gguf(gguf: GGUFFile) -> TransformerConfig:
    arch = gguf.architecture
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise GGUFError(f"{gguf.path}: unsupported architecture {arch!r}; supported: {SUPPORTED_GGUF_ARCHITECTURES}")
    key = lambda k: f"{arch}.{k}"  # noqa: E731
    num_layers = int(gguf.require(key("block_count")))
    hidden = int(gguf.require(key("embedding_length")))
    heads = int(gguf.require(key("attention.head_count")))
    head_dim = int(gguf.field(key("attention.key_length"), hidden // heads))
    vocab = gguf.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in gguf.tensors else None
    if vocab is None:
        raise GGUFError(f"{gguf.path}: missing tensor 'token_embd.weight'")
    base = float(gguf.field(key("rope.freq_base"), 1e6))
    eos = gguf.field("tokenizer.ggml.eos_token_id")
    common = dict(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(gguf.require(key("feed_forward_length"))),
        num_layers=num_layers, num_heads=heads, num_kv_heads=int(gguf.field(key("attention.head_count_kv"), heads)),
        head_dim=head_dim, rms_norm_eps=float(gguf.field(key("attention.layer_norm_rms_epsilon"), 1e-6)),
        max_position_embeddings=int(gguf.field(key("context_length"), 32768)),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        bos_token_id=gguf.field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=int(gguf.field("tokenizer.ggml.padding_token_id", 0)),
        name=str(gguf.field("general.name", Path(gguf.path).stem)),
    )
    if arch == "gemma3":
        layer_types = gemma3_layer_types(num_layers)
        # llama.cpp's rule: Gemma 3 27B scales queries by (d / heads)^-0.5, every other size by head_dim^-0.5.
        scalar = hidden / heads if num_layers == 62 else head_dim
        scaling = gguf.field(key("rope.scaling.factor"), 1.0) if gguf.field(key("rope.scaling.type")) == "linear" else 1.0
        return TransformerConfig(family="gemma3", layer_types=layer_types, rope_thetas=gemma3_rope_thetas(layer_types, base),
                                 sliding_window=int(gguf.require(key("attention.sliding_window"))),
                                 query_pre_attn_scalar=float(scalar), rope_scaling_factor=float(scaling), **common)
    return TransformerConfig(family="qwen3", layer_types=("full_attention",) * num_layers,
                             rope_thetas=(base,) * num_layers, **common)


def canonical_name(gguf_name: str, family: str) -> str | None:
    if gguf_name in _GLOBAL_RENAMES:
        return _GLOBAL_RENAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if not m:
        return None
    i, part = m.groups()
    if part == "ffn_norm":
        part_name = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    else:
        part_name = _LAYER_RENAMES.get(part)
    return None if part_name is None else f"layers.{i}.{part_name}.weight"


def canonical_tensors_from_gguf(gguf: GGUFFile, config: TransformerConfig) -> dict[str, np.ndarray]:
    """Dequantized float32 tensors under canonical names in HF [out, in] layout (Gemma norms un-shifted)."""
    expected = expected_shapes(config)
    out: dict[str, np.ndarray] = {}
    for name in gguf.tensors:
        canon = canonical_name(name, config.family)
        if canon is None or canon not in expected:
            continue
        arr = gguf.dequantize(name)
        if config.family == "gemma3" and canon.endswith("norm.weight"):
            arr = arr - 1.0  # llama.cpp stores Gemma's (1 + w); the model applies the +1 itself
        out[canon] = arr
    missing = sorted(set(expected) - set(out))
    if missing:
        raise GGUFError(f"{gguf.path}: missing tensors for {config.family}: {missing[:10]}")
    wrong = [f"{n}: expected {expected[n]}, got {out[n].shape}" for n in expected if out[n].shape != expected[n]]
    if wrong:
        raise GGUFError(f"{gguf.path}: tensor shapes do not match the config: {wrong[:10]}")
    return out


def _cache_key(path: str) -> str:
    st = os.stat(path)
    raw = f"{CACHE_FORMAT_VERSION}|{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def load_gguf_weights(path: str | os.PathLike, use_cache: bool = True
                      ) -> tuple[TransformerConfig, Mapping[str, np.ndarray], GGUFFile]:
    """Config and canonical float32 tensors of a GGUF file, dequantized once and cached as safetensors. With the
    cache the tensors come as a lazy `SafetensorsReader` over the cached file (each read when asked for: a model
    is built from it one tensor at a time); without it, as a dict."""
    gguf = GGUFFile(path)
    config = config_from_gguf(gguf)
    if not use_cache:
        return config, canonical_tensors_from_gguf(gguf, config), gguf
    target = cache_dir() / "gguf" / f"{_cache_key(gguf.path)}.safetensors"
    if target.exists():
        try:
            entries = safetensors_entries(str(target))
            if {k: e.shape for k, e in entries.items()} == expected_shapes(config):
                return config, SafetensorsReader(entries), gguf
            logging.warning("weight cache %s does not match %s: rebuilding it", target, gguf.path)
        except CheckpointError as e:  # corrupted cache entry: rebuild it
            logging.warning("ignoring corrupted weight cache %s (%s)", target, e)
    logging.info("dequantizing %s into %s (once)", gguf.path, target)
    tensors = canonical_tensors_from_gguf(gguf, config)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"source": gguf.path, "config": json.dumps(config.name)})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    del tensors
    return config, SafetensorsReader(safetensors_entries(str(target))), gguf

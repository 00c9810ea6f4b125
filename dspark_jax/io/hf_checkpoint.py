"""Load Hugging Face (transformers) Qwen 3 / Gemma 3 checkpoints: config.json (`io.hf_config`) + safetensors.

Weights come back as a flat dict of numpy arrays (float32 by default) keyed by *canonical* names: the HF
text-model tensor names without the `model.` / `language_model.model.` / `model.language_model.` prefix, in torch
`[out, in]` layout (`embed_tokens.weight`, `layers.3.self_attn.q_proj.weight`, `norm.weight`,
`lm_head.weight` only for untied heads). Norm weights are returned exactly as stored.

Files are read through `safetensors.safe_open` (headers validated against the file size before any data is
read; bfloat16 through ml_dtypes), one tensor at a time.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import numpy as np
from safetensors import SafetensorError, safe_open

from dspark_jax.io.hf_config import CheckpointError, load_hf_config, read_json
from dspark_jax.models.config import TransformerConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Longest first: the first matching prefix is stripped.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
# Tensors of a multimodal wrapper that the text model does not use.
_NON_TEXT_MARKERS = ("vision_tower.", "vision_model.", "multi_modal_projector.")
# Buffers some older exports carry; harmless to drop.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_MAX_LISTED = 10


# -------------------------------------------------------------------------------------------- weights

def expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name → torch-layout shape, for every tensor the text model needs."""
    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q_out, kv_out = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, h)}
    norms = ["input_layernorm", "post_attention_layernorm"]
    if config.family == "gemma3":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(config.num_layers):
        p = f"layers.{i}."
        for n in norms:
            shapes[f"{p}{n}.weight"] = (h,)
        shapes[f"{p}self_attn.q_proj.weight"] = (q_out, h)
        shapes[f"{p}self_attn.k_proj.weight"] = (kv_out, h)
        shapes[f"{p}self_attn.v_proj.weight"] = (kv_out, h)
        shapes[f"{p}self_attn.o_proj.weight"] = (h, q_out)
        shapes[f"{p}self_attn.q_norm.weight"] = (hd,)
        shapes[f"{p}self_attn.k_norm.weight"] = (hd,)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, inter)
    shapes["norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_TRUNCATED = ("incomplete metadata", "not fully covered", "header too small", "invalid header length")


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: its file, stored name, safetensors dtype (F32, BF16, ...) and shape."""
    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]


def _safetensors_error(path: str, error: Exception) -> CheckpointError:
    message = str(error)
    if isinstance(error, FileNotFoundError):
        return CheckpointError(f"{path}: safetensors file not found")
    if any(t in message for t in _TRUNCATED):
        return CheckpointError(f"{path}: truncated or corrupted safetensors file ({message})")
    return CheckpointError(f"{path}: corrupted safetensors header ({message})")


def safetensors_entries(path: str) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file (validated against the file size by `safetensors`); no data read."""
    try:
        with safe_open(path, framework="np") as f:
            entries = {}
            for name in f.keys():
                tensor = f.get_slice(name)
                entries[name] = TensorEntry(path, name, tensor.get_dtype(), tuple(tensor.get_shape()))
            return entries
    except (SafetensorError, OSError) as e:
        raise _safetensors_error(path, e) from None


def _canonical(name: str) -> str | None:
    """Canonical text-model name, or None for tensors the text model does not use."""
    if any(m in name for m in _NON_TEXT_MARKERS) or name.endswith(_IGNORED_SUFFIXES):
        return None
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def listing(items: list[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    return shown + (f"; ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def checkpoint_entries(model_dir: str) -> tuple[str, dict[str, TensorEntry]]:
    """(description of the checkpoint, canonical name → entry) from the single file or the index."""
    single = os.path.join(model_dir, SINGLE_FILE)
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(single):
        described, stored = single, safetensors_entries(single)
    elif os.path.isfile(index):
        described = index
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing or empty 'weight_map'")
        needed_shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise CheckpointError(f"{index}: bad shard file name {shard!r} for tensor {name!r}")
            if _canonical(name) is not None:
                needed_shards.setdefault(shard, []).append(name)
        missing = [s for s in sorted(needed_shards) if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) listed in the index are missing from "
                                  f"{model_dir}: {listing(missing)}")
        stored = {}
        for shard, names in sorted(needed_shards.items()):
            path = os.path.join(model_dir, shard)
            entries = safetensors_entries(path)
            absent = [n for n in names if n not in entries]
            if absent:
                raise CheckpointError(f"{path}: tensors that {INDEX_FILE} places in this shard are not in "
                                      f"it: {listing(absent)}")
            for n in names:
                stored[n] = entries[n]
    else:
        others = sorted(f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth", ".gguf")))
        hint = f" (found {', '.join(others)}; only safetensors checkpoints are supported)" if others else ""
        raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found{hint}")

    canonical: dict[str, TensorEntry] = {}
    for name, entry in stored.items():
        cname = _canonical(name)
        if cname is None:
            continue
        if cname in canonical:
            raise CheckpointError(f"{described}: tensors {canonical[cname].name!r} and {name!r} both map "
                                  f"to {cname!r}")
        canonical[cname] = entry
    return described, canonical


def check_float_dtypes(entries: Mapping[str, TensorEntry]) -> None:
    """CheckpointError unless every tensor is stored in a float dtype (F64, F32, F16, BF16)."""
    for cname, entry in entries.items():
        if entry.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{entry.file}: tensor {entry.name!r} ({cname}) has dtype {entry.dtype}; "
                                  f"expected a float dtype ({', '.join(_FLOAT_DTYPES)})")


class SafetensorsReader(Mapping):
    """canonical name → array (stored dtype; bfloat16 as ml_dtypes.bfloat16), each tensor read from its
    safetensors file when asked for (the files stay open until `close`): a model can be built one tensor at a
    time (`models.transformer.model_from_canonical`) without the whole checkpoint in host memory."""

    def __init__(self, entries: Mapping[str, TensorEntry]):
        self.entries = dict(entries)
        self._files: dict[str, object] = {}

    def __getitem__(self, cname: str) -> np.ndarray:
        entry = self.entries[cname]
        try:
            handle = self._files.get(entry.file)
            if handle is None:
                handle = self._files[entry.file] = safe_open(entry.file, framework="np")
            return handle.get_tensor(entry.name).reshape(entry.shape)
        except (SafetensorError, OSError) as e:
            raise _safetensors_error(entry.file, e) from None

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def close(self) -> None:
        self._files.clear()  # safe_open handles release their memory maps when dropped


def read_tensors(entries: Mapping[str, TensorEntry], dtype=np.float32) -> dict[str, np.ndarray]:
    """canonical name → array in `dtype` (float32 by default), read one tensor at a time (`SafetensorsReader`)."""
    check_float_dtypes(entries)
    reader = SafetensorsReader(entries)
    return {c: np.asarray(reader[c]).astype(dtype) for c in entries}


def open_hf_weights(model_dir: str | os.PathLike, config: TransformerConfig) -> SafetensorsReader:
    """The validated text-model weights of `model_dir` (see `load_hf_weights`), read lazily."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: model directory not found")
    described, entries = checkpoint_entries(model_dir)
    if config.tie_word_embeddings:
        entries.pop("lm_head.weight", None)
    expected = expected_shapes(config)
    problems = []
    missing = [n for n in expected if n not in entries]
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {listing(missing)}")
    wrong = [f"{n} expected {expected[n]} got {entries[n].shape}" for n in expected
             if n in entries and entries[n].shape != expected[n]]
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape for the config: {listing(wrong)}")
    unexpected = sorted(n for n in entries if n not in expected)
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {listing(unexpected)}")
    if problems:
        raise CheckpointError(f"{described}: checkpoint does not match the config ({config.family}, "
                              f"{config.num_layers} layers, hidden {config.hidden_size}): "
                              + " | ".join(problems))
    check_float_dtypes(entries)
    return SafetensorsReader({n: entries[n] for n in expected})


def load_hf_weights(model_dir: str | os.PathLike, config: TransformerConfig) -> dict[str, np.ndarray]:
    """Load and validate the text-model weights of `model_dir` as canonical-name → float32 arrays.

    Every tensor in `expected_shapes(config)` must be present with exactly that shape; text tensors
    the model would not use are an error (they would be silently ignored otherwise), except a stored
    `lm_head.weight` of a tied model, which is dropped. Vision-tower / projector tensors are skipped
    without being read.
    """
    reader = open_hf_weights(model_dir, config)
    return {name: np.asarray(reader[name], np.float32) for name in reader}


def load_hf_checkpoint(model_dir: str | os.PathLike) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """`load_hf_config` followed by `load_hf_weights`."""
    config = load_hf_config(model_dir)
    return config, load_hf_weights(model_dir, config)


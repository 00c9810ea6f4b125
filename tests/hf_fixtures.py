"""Tiny random Hugging Face models saved locally, for tests (`from tests.hf_fixtures import ...`).

Not a test module. Everything is created with transformers on the spot (no hub access): float32,
eval mode, eager attention, every norm weight randomized (HF initializes them to 0 / 1, which would
hide a missing `1 + w` or a swapped norm), and non-default RoPE bases / attention scalar so that a
loader falling back to defaults shows up.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("qwen3", "gemma3")
TINY_VOCAB = 128
TINY_HIDDEN = 64
TINY_MAX_POSITIONS = 256
GEMMA3_LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
GEMMA3_ROPE = {"sliding_attention": 5_000.0, "full_attention": 500_000.0}
QWEN3_ROPE_THETA = 1_000_000.0
HF_CACHE_ENV = "DSPARK_TEST_HF_CACHE"  # where HF's own loads of a GGUF are kept ('' disables)


def tiny_config(family: str, *, sliding_window: int | None = None, tie: bool = True, **overrides: Any):
    """The transformers config of a tiny model (`overrides` go to the config constructor)."""
    common: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=TINY_MAX_POSITIONS,
        rms_norm_eps=1e-6, tie_word_embeddings=tie, initializer_range=0.05, attn_implementation="eager")
    if family == "qwen3":
        from transformers import Qwen3Config

        if sliding_window is not None:
            raise ValueError("Qwen 3 fixtures use full attention only (sliding windows are unsupported)")
        kwargs = dict(common, num_hidden_layers=3, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      rope_parameters={"rope_type": "default", "rope_theta": QWEN3_ROPE_THETA})
        kwargs.update(overrides)
        return Qwen3Config(**kwargs)
    if family == "gemma3":
        from transformers import Gemma3TextConfig

        kwargs = dict(common, num_hidden_layers=len(GEMMA3_LAYER_TYPES), layer_types=list(GEMMA3_LAYER_TYPES),
                      sliding_window=8 if sliding_window is None else sliding_window,
                      query_pre_attn_scalar=24,  # != head_dim, so the attention scale is exercised
                      rope_parameters={t: {"rope_type": "default", "rope_theta": theta}
                                       for t, theta in GEMMA3_ROPE.items()},
                      bos_token_id=2, eos_token_id=1, pad_token_id=0)
        kwargs.update(overrides)
        return Gemma3TextConfig(**kwargs)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def randomize_norms(model: torch.nn.Module, family: str, seed: int = 0) -> None:
    """Give every RMSNorm weight a non-trivial value (Gemma stores w and applies 1 + w)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                noise = torch.rand(param.shape, generator=gen, dtype=torch.float32) - 0.5
                param.copy_(noise if family == "gemma3" else 1.0 + noise)


def make_tiny_hf_model(family: str, out_dir: str | os.PathLike, *, seed: int = 0,
                       sliding_window: int | None = None, tie: bool = True,
                       max_shard_size: str | int | None = None, **overrides: Any):
    """Create, randomize and save a tiny `Qwen3ForCausalLM` / `Gemma3ForCausalLM`.

    Returns `(torch_model, out_dir)`; the model is float32 in eval mode and was saved with
    `save_pretrained(out_dir, safe_serialization=True)` (sharded when `max_shard_size` is given).
    """
    from transformers import Gemma3ForCausalLM, Qwen3ForCausalLM

    config = tiny_config(family, sliding_window=sliding_window, tie=tie, **overrides)
    torch.manual_seed(seed)
    model = (Qwen3ForCausalLM if family == "qwen3" else Gemma3ForCausalLM)(config)
    model = model.to(torch.float32).eval()
    randomize_norms(model, family, seed)
    out_dir = os.fspath(out_dir)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **save_kwargs)
    _check_round_trip(config, out_dir)
    return model, out_dir


def make_tiny_gemma3_multimodal(out_dir: str | os.PathLike, *, seed: int = 0):
    """A tiny `Gemma3ForConditionalGeneration` (model_type "gemma3", SigLIP tower) saved to `out_dir`."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = tiny_config("gemma3").to_dict()
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=127, boi_token_index=125, eoi_token_index=126,
                          eos_token_id=[1, 106])
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
    randomize_norms(model, "gemma3", seed)
    out_dir = os.fspath(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model, out_dir


def text_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's text tensors keyed by canonical name (prefix stripped, vision tensors dropped)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if "vision_tower" in name or "multi_modal_projector" in name:
            continue
        for prefix in ("model.language_model.", "language_model.model.", "language_model.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[name] = tensor.detach()
    return out


def _check_round_trip(config, out_dir: str) -> None:
    reloaded = type(config).from_pretrained(out_dir)
    for key in ("layer_types", "rope_parameters", "sliding_window", "tie_word_embeddings",
                "max_position_embeddings", "num_hidden_layers", "head_dim"):
        before, after = getattr(config, key, None), getattr(reloaded, key, None)
        if before != after:
            raise AssertionError(f"{out_dir}: config field {key} does not round-trip: {before!r} -> {after!r}")


def hf_from_gguf(gguf_path: str | os.PathLike, what: str):
    """HF transformers' own load of a GGUF file — `what` "model" (a float32 causal LM in eval mode) or
    "tokenizer" —, the independent reference of the parity tests.

    transformers dequantizes a GGUF in Python (~60 s for the 270M model, ~20 s for its tokenizer on a 2-core
    CPU), so the first load is kept under $DSPARK_TEST_HF_CACHE (default ~/.cache/dspark_jax/hf_reference; ''
    disables), keyed by the file's SHA-256 and the transformers and torch versions, and later loads read that copy:
    what HF converted, never our own loader's output. The tokenizer is kept with `save_pretrained`; the model,
    which `save_pretrained` refuses once loaded from a GGUF, as its dequantized weights (safetensors) and its
    config without the quantization entry. Written to a temporary directory and renamed into place, so an
    interrupted save is never read."""
    import transformers

    if what not in ("model", "tokenizer"):
        raise ValueError(f"what must be 'model' or 'tokenizer', got {what!r}")
    gguf_path = Path(gguf_path)
    auto = transformers.AutoModelForCausalLM if what == "model" else transformers.AutoTokenizer
    kwargs = {"dtype": torch.float32} if what == "model" else {}

    def load(directory: Path, **extra):
        obj = auto.from_pretrained(str(directory), **extra, **kwargs)
        return obj.eval() if what == "model" else obj

    root = os.environ.get(HF_CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "dspark_jax", "hf_reference"))
    if not root:
        return load(gguf_path.parent, gguf_file=gguf_path.name)
    key = f"{_file_sha256(str(gguf_path))[:20]}-transformers{transformers.__version__}-torch{torch.__version__}"
    cached = Path(root) / key / what
    if cached.is_dir():
        return load(cached)
    obj = load(gguf_path.parent, gguf_file=gguf_path.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{what}."))
    try:
        if what == "model":
            from safetensors.torch import save_model

            config = obj.config.to_dict()
            config.pop("quantization_config", None)
            type(obj.config).from_dict(config).to_json_file(str(tmp / "config.json"))
            save_model(obj, str(tmp / "model.safetensors"))  # tied tensors stored once
        else:
            obj.save_pretrained(str(tmp))
        os.replace(tmp, cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; left only by a failed save or a race
    return obj


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, once per path and process (the model and its tokenizer share a GGUF)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()

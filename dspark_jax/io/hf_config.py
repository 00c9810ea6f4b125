"""Hugging Face (transformers) Qwen 3 / Gemma 3 `config.json` → TransformerConfig, with every field checked
(missing, wrong type, unsupported model type or layer layout → CheckpointError naming the file and field)."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from dspark_jax.models.config import TransformerConfig, gemma3_layer_types

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("qwen3", "gemma3_text", "gemma3")
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


_REQUIRED = object()

# HF Gemma3TextConfig defaults (transformers 5.x). Multimodal `gemma3` checkpoints on the Hub store
# only the non-default text fields (e.g. gemma-3-4b has no vocab_size / head counts in text_config),
# so these are needed to read them. The three size fields are always present and stay required.
_GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1,
    "pad_token_id": 0, "final_logit_softcapping": None, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6,
}
# HF Qwen3Config defaults for optional fields (head_dim is 128 for every released Qwen 3 size).
_QWEN3_DEFAULTS: dict[str, Any] = {
    "head_dim": 128, "max_position_embeddings": 32_768, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "rope_theta": 10_000.0, "bos_token_id": None, "eos_token_id": None,
    "pad_token_id": None,
}
_ACTIVATIONS = {"qwen3": ("hidden_act", "silu"), "gemma3": ("hidden_activation", "gelu_pytorch_tanh")}


class CheckpointError(ValueError):
    """A Hugging Face checkpoint is missing, truncated, corrupted, inconsistent or unsupported."""


# --------------------------------------------------------------------------------------------- config

def _src(source: str) -> str:
    return source or "<config>"


def config_value(cfg: Mapping[str, Any], key: str, source: str, kind: type | tuple[type, ...],
         default: Any = _REQUIRED, nullable: bool = False) -> Any:
    """`cfg[key]` checked against `kind`; missing → `default` (or an error when required)."""
    if key not in cfg or (cfg[key] is None and default is not _REQUIRED and not nullable):
        if default is _REQUIRED:
            raise CheckpointError(f"{_src(source)}: required key {key!r} is missing")
        return default
    value = cfg[key]
    if value is None and nullable:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        names = "/".join(k.__name__ for k in kinds)
        raise CheckpointError(f"{_src(source)}: key {key!r} must be {names}, got {value!r}")
    return value


def _token_ids(value: Any, key: str, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"{_src(source)}: {key!r} must be an int or a list of ints, got {value!r}")
    return tuple(values)


def _rope_kind(params: Mapping[str, Any], where: str, source: str) -> float:
    """Linear scaling factor of one RoPE parameter set; only 'default' and 'linear' are supported."""
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return 1.0
    if rope_type == "linear":
        factor = params.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            raise CheckpointError(f"{_src(source)}: linear RoPE scaling of {where} needs a positive "
                                  f"'factor', got {factor!r}")
        return float(factor)
    raise CheckpointError(f"{_src(source)}: unsupported RoPE type {rope_type!r} for {where}; "
                          "supported: 'default', 'linear'")


def _theta(params: Mapping[str, Any], fallback: Any, where: str, source: str) -> float:
    theta = params.get("rope_theta", fallback)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise CheckpointError(f"{_src(source)}: RoPE base (rope_theta) of {where} must be a positive "
                              f"number, got {theta!r}")
    return float(theta)


def _as_dict(value: Any, key: str, source: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{_src(source)}: {key!r} must be an object, got {value!r}")
    return dict(value)


def _rope(family: str, cfg: Mapping[str, Any], layer_types: tuple[str, ...],
          source: str) -> tuple[tuple[float, ...], float]:
    """Per-layer RoPE bases and the linear scaling factor of full-attention layers.

    Accepts the transformers >= 5 `rope_parameters` layout (Gemma 3: keyed by layer type; Qwen 3:
    flat) and the legacy top-level `rope_theta` / `rope_local_base_freq` / `rope_scaling` keys;
    `rope_parameters` wins where both give a value, as in transformers.
    """
    params = _as_dict(cfg.get("rope_parameters"), "rope_parameters", source)
    legacy_scaling = _as_dict(cfg.get("rope_scaling"), "rope_scaling", source)
    layer_keys = {"full_attention", "sliding_attention"}
    if family == "gemma3":
        if params and not set(params) <= layer_keys:
            raise CheckpointError(f"{_src(source)}: Gemma 3 'rope_parameters' must be keyed by layer "
                                  f"type {sorted(layer_keys)}, got keys {sorted(params)}")
        full = {**legacy_scaling,
                **_as_dict(params.get("full_attention"), "rope_parameters.full_attention", source)}
        sliding = _as_dict(params.get("sliding_attention"), "rope_parameters.sliding_attention", source)
        full_theta = _theta(full, cfg.get("rope_theta", _GEMMA3_DEFAULTS["rope_theta"]),
                            "full_attention layers", source)
        local_theta = _theta(sliding, cfg.get("rope_local_base_freq", _GEMMA3_DEFAULTS["rope_local_base_freq"]),
                             "sliding_attention layers", source)
        factor = _rope_kind(full, "full_attention layers", source)
        if _rope_kind(sliding, "sliding_attention layers", source) != 1.0:
            raise CheckpointError(f"{_src(source)}: RoPE scaling of sliding_attention layers is not "
                                  "supported (only full_attention layers may use linear scaling)")
        thetas = tuple(full_theta if t == "full_attention" else local_theta for t in layer_types)
        return thetas, factor
    if params and set(params) <= layer_keys:  # per-type layout; every Qwen 3 layer is full attention
        params = _as_dict(params.get("full_attention"), "rope_parameters.full_attention", source)
    merged = {**legacy_scaling, **params}
    theta = _theta(merged, cfg.get("rope_theta", _QWEN3_DEFAULTS["rope_theta"]), "all layers", source)
    return (theta,) * len(layer_types), _rope_kind(merged, "all layers", source)


def _layer_types(family: str, cfg: Mapping[str, Any], num_layers: int, source: str) -> tuple[str, ...]:
    if family == "qwen3":
        if cfg.get("use_sliding_window"):
            raise CheckpointError(f"{_src(source)}: Qwen 3 with use_sliding_window=true is not supported "
                                  "(released Qwen 3 checkpoints use full attention in every layer)")
        types = cfg.get("layer_types")
        if types is not None and any(t != "full_attention" for t in types):
            raise CheckpointError(f"{_src(source)}: Qwen 3 layer_types must all be 'full_attention', "
                                  f"got {sorted(set(types))}")
        return ("full_attention",) * num_layers
    types = cfg.get("layer_types")
    if types is None:
        pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern",
                                                          _GEMMA3_DEFAULTS["sliding_window_pattern"]))
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
            raise CheckpointError(f"{_src(source)}: sliding_window_pattern must be a positive int, "
                                  f"got {pattern!r}")
        return gemma3_layer_types(num_layers, pattern)
    if not isinstance(types, (list, tuple)) or len(types) != num_layers:
        raise CheckpointError(f"{_src(source)}: layer_types must list num_hidden_layers ({num_layers}) "
                              f"entries, got {types!r}")
    bad = sorted({str(t) for t in types} - {"sliding_attention", "full_attention"})
    if bad:
        raise CheckpointError(f"{_src(source)}: unknown layer types {bad} in layer_types "
                              "(supported: 'sliding_attention', 'full_attention')")
    return tuple(types)


def config_from_hf(config_dict: Mapping[str, Any], name: str = "", *, source: str | None = None,
                   generation_config: Mapping[str, Any] | None = None) -> TransformerConfig:
    """Build a `TransformerConfig` from a parsed HF `config.json`.

    `name` becomes `TransformerConfig.name`; errors name `source` (default: `name`). EOS ids are the
    union of the config's (for the multimodal `gemma3` wrapper: top level, then `text_config`) and
    those of `generation_config` (parsed `generation_config.json`), in that order.
    """
    source = name if source is None else source
    if not isinstance(config_dict, Mapping):
        raise CheckpointError(f"{_src(source)}: expected a JSON object, got {type(config_dict).__name__}")
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{_src(source)}: unsupported model_type {model_type!r}; supported model "
                              f"types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    outer: Mapping[str, Any] = {}
    cfg: Mapping[str, Any] = config_dict
    if model_type == "gemma3":
        text = config_dict.get("text_config")
        if not isinstance(text, Mapping):
            raise CheckpointError(f"{_src(source)}: model_type 'gemma3' needs a 'text_config' object")
        inner_type = text.get("model_type", "gemma3_text")
        if inner_type != "gemma3_text":
            raise CheckpointError(f"{_src(source)}: text_config.model_type must be 'gemma3_text', "
                                  f"got {inner_type!r}")
        outer, cfg = config_dict, text
        source = f"{_src(source)} (text_config)"
    family = "qwen3" if model_type == "qwen3" else "gemma3"
    defaults = _QWEN3_DEFAULTS if family == "qwen3" else _GEMMA3_DEFAULTS

    def opt(key, kind, nullable=False):
        return config_value(cfg, key, source, kind, defaults.get(key) if key in defaults else _REQUIRED,
                    nullable=nullable)

    def req(key, kind):
        return config_value(cfg, key, source, kind)

    for key, (unsupported, why) in {
        "attention_bias": (True, "attention projections with bias"),
        "use_bidirectional_attention": (True, "bidirectional (encoder) attention"),
    }.items():
        if cfg.get(key) is unsupported:
            raise CheckpointError(f"{_src(source)}: {key}={unsupported} ({why}) is not supported")
    if cfg.get("attn_logit_softcapping") is not None:
        raise CheckpointError(f"{_src(source)}: attn_logit_softcapping="
                              f"{cfg['attn_logit_softcapping']!r} is not supported")
    act_key, act = _ACTIVATIONS[family]
    if cfg.get(act_key) not in (None, act):
        raise CheckpointError(f"{_src(source)}: {act_key}={cfg[act_key]!r} is not supported for "
                              f"{family} (expected {act!r})")

    hidden = req("hidden_size", int)
    num_layers = req("num_hidden_layers", int)
    intermediate = req("intermediate_size", int)
    if family == "qwen3":
        vocab = req("vocab_size", int)
        heads = req("num_attention_heads", int)
        kv_heads = config_value(cfg, "num_key_value_heads", source, int, heads)
    else:
        vocab = opt("vocab_size", int)
        heads = opt("num_attention_heads", int)
        kv_heads = opt("num_key_value_heads", int)
    head_dim = opt("head_dim", int)
    layer_types = _layer_types(family, cfg, num_layers, source)
    rope_thetas, rope_factor = _rope(family, cfg, layer_types, source)

    sliding_window = None
    query_pre_attn_scalar = None
    if family == "gemma3":
        sliding_window = opt("sliding_window", int, nullable=True)
        query_pre_attn_scalar = opt("query_pre_attn_scalar", (int, float))
        query_pre_attn_scalar = float(query_pre_attn_scalar)
    softcap = config_value(cfg, "final_logit_softcapping", source, float, None, nullable=True)

    generation_config = generation_config or {}
    gen_source = f"{_src(source)} ({GENERATION_CONFIG_FILE})"

    def first_present(key):
        for d in (outer, cfg):
            if d.get(key) is not None:
                return d[key]
        return generation_config.get(key, defaults.get(key))

    eos: list[int] = []
    for d, src in ((outer, source), (cfg, source), (generation_config, gen_source)):
        for t in _token_ids(d.get("eos_token_id"), "eos_token_id", src):
            if t not in eos:
                eos.append(t)
    if not eos:
        eos.extend(_token_ids(defaults.get("eos_token_id"), "eos_token_id", source))
    bos = _token_ids(first_present("bos_token_id"), "bos_token_id", source)
    pad = _token_ids(first_present("pad_token_id"), "pad_token_id", source)
    tie = outer.get("tie_word_embeddings")
    if tie is None:
        tie = cfg.get("tie_word_embeddings")
    if tie is None:
        tie = defaults["tie_word_embeddings"]
    if not isinstance(tie, bool):
        raise CheckpointError(f"{_src(source)}: tie_word_embeddings must be a bool, got {tie!r}")

    try:
        return TransformerConfig(
            family=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
            num_layers=num_layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rope_thetas=rope_thetas, layer_types=layer_types,
            rms_norm_eps=float(opt("rms_norm_eps", float)), sliding_window=sliding_window,
            query_pre_attn_scalar=query_pre_attn_scalar, tie_word_embeddings=tie,
            rope_scaling_factor=rope_factor,
            max_position_embeddings=opt("max_position_embeddings", int),
            final_logit_softcapping=softcap,
            bos_token_id=bos[0] if bos else None, eos_token_ids=tuple(eos),
            pad_token_id=pad[0] if pad else 0, name=name)
    except ValueError as e:
        raise CheckpointError(f"{_src(source)}: invalid config: {e}") from e


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e


def load_hf_config(model_dir: str | os.PathLike) -> TransformerConfig:
    """Parse `model_dir/config.json` (+ `generation_config.json` when present)."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: model directory not found")
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found ({CONFIG_FILE} is required in a HF model directory)")
    config_dict = read_json(path)
    gen_path = os.path.join(model_dir, GENERATION_CONFIG_FILE)
    gen = read_json(gen_path) if os.path.isfile(gen_path) else None
    if gen is not None and not isinstance(gen, dict):
        raise CheckpointError(f"{gen_path}: expected a JSON object")
    name = os.path.basename(os.path.normpath(os.path.abspath(model_dir)))
    return config_from_hf(config_dict, name=name, source=path, generation_config=gen)

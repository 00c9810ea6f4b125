"""Load DeepSeek DeepSpec DSpark / DFlash drafter checkpoints (spec §1.11) into `DSparkDrafter`.

A DeepSpec drafter directory is an HF-style `config.json` (the target's Qwen 3 config with
`num_hidden_layers` = number of draft layers, `architectures=["Qwen3DSparkModel"]` and the DSpark fields
`block_size`, `mask_token_id`, `target_layer_ids`, `num_target_layers`, `markov_rank`, `markov_head_type`,
`enable_confidence_head`, `confidence_head_with_markov`, `num_anchors`) plus `model.safetensors` or a
sharded `model.safetensors.index.json`. Tensors are torch-layout (`Linear.weight` is [out, in]):

  fc.weight [d, m·d], hidden_norm.weight [d], layers.{i}.* (Qwen 3 decoder layers), norm.weight [d],
  markov_head.markov_w1.weight [V, r] (embedding), markov_head.markov_w2.weight [V, r] (Linear r→V),
  markov_head.gate_proj.{weight [r, d+r], bias [r]} (gated), markov_head.joint_proj.{weight [3r, 2r+d],
  bias [3r]} (rnn), confidence_head.proj.{weight [1, d(+r)], bias [1]},
  embed_tokens.weight / lm_head.weight [V, d]: frozen copies of the target's embedding and head.

Our drafter reads the target's embedding and head directly, so the frozen copies are only shape-checked
(and, when `target_model` is given, compared with the target's). DFlash checkpoints are the same with
`markov_rank` 0 and no confidence head. Only Qwen 3 drafters are supported (DeepSpec's Gemma 4 drafters
have a different layer layout).

Files are read with the torch-free safetensors reader of `hf_checkpoint` (header validated against the
file size before any data is read, bf16 upcast without torch).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.drafters.base import draft_head_matrix, draft_layer_config
from dspark_jax.drafters.config import MARKOV_HEAD_TYPES, DrafterConfig
from dspark_jax.drafters.dspark import DSparkDrafter
from dspark_jax.drafters.vocab import build_maps
from dspark_jax.io.hf_checkpoint import checkpoint_entries, expected_shapes, listing, read_tensors
from dspark_jax.io.hf_config import CONFIG_FILE, CheckpointError, config_from_hf, config_value, read_json
from dspark_jax.models.config import TransformerConfig
from dspark_jax.models.transformer import canonical_to_pure_dict

DEEPSPEC_ARCHITECTURES: tuple[str, ...] = ("Qwen3DSparkModel",)
# Frozen copies of the target's embedding / LM head: shape-checked, not loaded.
FROZEN_COPIES: tuple[str, ...] = ("embed_tokens.weight", "lm_head.weight")
# Relative tolerance of the optional frozen-copy comparison (bf16 rounding of either side is 2^-8).
_COPY_RTOL = 2.0 ** -7


class DrafterMismatchError(CheckpointError):
    """A drafter checkpoint is valid but does not fit the given target (or the target is unsupported)."""


def _gemma_unsupported(what: str) -> DrafterMismatchError:
    return DrafterMismatchError(f"{what}: DeepSpec Gemma 4 drafters are not supported; only DeepSpec's Qwen 3 "
                                "DSpark/DFlash drafters (architecture Qwen3DSparkModel) can be loaded")


def _is_gemma(config_dict: Mapping[str, Any]) -> bool:
    archs = config_dict.get("architectures") or []
    model_type = str(config_dict.get("model_type") or "")
    return (model_type.startswith("gemma") or "text_config" in config_dict
            or any("gemma" in str(a).lower() for a in (archs if isinstance(archs, list) else [archs])))


def _check_architecture(config_dict: Mapping[str, Any], source: str) -> None:
    if _is_gemma(config_dict):
        raise _gemma_unsupported(source)
    archs = config_dict.get("architectures")
    if archs is None:
        return
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"{source}: 'architectures' must be a list of strings, got {archs!r}")
    if not any(a in DEEPSPEC_ARCHITECTURES for a in archs):
        hint = (" (Eagle3 checkpoints are not DSpark/DFlash drafters)"
                if any("eagle" in a.lower() for a in archs) else "")
        raise CheckpointError(f"{source}: architectures {archs} is not a DeepSpec DSpark/DFlash drafter "
                              f"(expected one of {list(DEEPSPEC_ARCHITECTURES)}){hint}")


def _mismatch(source: str, what: str, drafter_value: Any, target: TransformerConfig, target_value: Any,
              hint: str = "") -> DrafterMismatchError:
    return DrafterMismatchError(f"{source}: drafter {what} is {drafter_value}, but the target "
                                f"{target.name or target.family} has {target_value}{hint}")


def _int_list(value: Any, key: str, source: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"{source}: {key!r} must be a non-empty list of ints, got {value!r}")
    return tuple(value)


def drafter_config_from_deepspec(config_dict: Mapping[str, Any], target: TransformerConfig, *,
                                 source: str = "<deepspec config>") -> DrafterConfig:
    """The `DrafterConfig` of a parsed DeepSpec drafter `config.json`, validated against `target`.

    algorithm: "dspark" when the checkpoint has a Markov head (markov_rank > 0) or a confidence head,
    else "dflash". Raises `DrafterMismatchError` naming the mismatch when the drafter was built for a
    different target (widths, head counts, vocabulary, RoPE, number of target layers, tapped layers), and
    `CheckpointError` when the config itself is malformed.
    """
    if not isinstance(config_dict, Mapping):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(config_dict).__name__}")
    if target.family != "qwen3":
        raise _gemma_unsupported(f"{source}: target family {target.family!r}") if target.family.startswith(
            "gemma") else DrafterMismatchError(f"{source}: DeepSpec drafters need a Qwen 3 target, got "
                                               f"{target.family!r}")
    _check_architecture(config_dict, source)

    # The Qwen 3 fields (the draft config is a copy of the target's): parse them like a HF config.
    draft = config_from_hf({**config_dict, "model_type": "qwen3"}, source=source)
    layer_cfg = draft_layer_config(target, draft.num_layers)
    for what, ours, theirs in (
            ("hidden_size", draft.hidden_size, target.hidden_size),
            ("num_attention_heads", draft.num_heads, target.num_heads),
            ("num_key_value_heads", draft.num_kv_heads, target.num_kv_heads),
            ("head_dim", draft.head_dim, target.head_dim),
            ("intermediate_size", draft.intermediate_size, target.intermediate_size),
            ("vocab_size", draft.vocab_size, target.vocab_size),
            ("RoPE base (rope_theta)", draft.rope_thetas[0], layer_cfg.rope_thetas[0]),
            ("RoPE linear scaling factor", draft.rope_scaling_factor, layer_cfg.rope_scaling_factor)):
        if ours != theirs:
            raise _mismatch(source, what, ours, target, theirs)
    if not math.isclose(draft.rms_norm_eps, target.rms_norm_eps, rel_tol=1e-6):
        raise _mismatch(source, "rms_norm_eps", draft.rms_norm_eps, target, target.rms_norm_eps)

    num_target_layers = config_value(config_dict, "num_target_layers", source, int, None)
    if num_target_layers is not None and num_target_layers != target.num_layers:
        raise _mismatch(source, "num_target_layers", num_target_layers, target,
                        f"{target.num_layers} layers", " (the drafter was trained for a different target)")
    ids = _int_list(config_value(config_dict, "target_layer_ids", source, list), "target_layer_ids", source)
    if list(ids) != sorted(set(ids)):
        raise CheckpointError(f"{source}: target_layer_ids must be strictly increasing, got {list(ids)}")
    bad = [i for i in ids if not -1 <= i < target.num_layers - 1]
    if bad:
        raise DrafterMismatchError(
            f"{source}: target_layer_ids {list(ids)} include {bad}, out of range for the target's "
            f"{target.num_layers} layers (valid: -1 = embeddings, 0..{target.num_layers - 2}; the last layer "
            "cannot be tapped)")

    block_size = config_value(config_dict, "block_size", source, int)
    mask_token_id = config_value(config_dict, "mask_token_id", source, int)
    if not 0 <= mask_token_id < target.vocab_size:
        raise _mismatch(source, "mask_token_id", mask_token_id, target,
                        f"a vocabulary of {target.vocab_size}")
    markov_rank = config_value(config_dict, "markov_rank", source, int, 0)
    markov_type = config_value(config_dict, "markov_head_type", source, str, "vanilla") if markov_rank else "vanilla"
    if markov_type not in MARKOV_HEAD_TYPES:
        raise CheckpointError(f"{source}: unsupported markov_head_type {markov_type!r}; supported: "
                              f"{', '.join(MARKOV_HEAD_TYPES)}")
    if "enable_confidence_head" in config_dict:
        confidence = config_value(config_dict, "enable_confidence_head", source, bool)
    else:  # training-config spelling
        confidence = config_value(config_dict, "confidence_head_alpha", source, float, 0.0) > 0.0
    with_markov = config_value(config_dict, "confidence_head_with_markov", source, bool, True) if confidence else True
    if confidence and with_markov and not markov_rank:
        raise CheckpointError(f"{source}: confidence_head_with_markov=true needs a Markov head "
                              "(markov_rank > 0)")
    algorithm = "dspark" if markov_rank or confidence else "dflash"
    try:
        config = DrafterConfig(algorithm, ids, block_size=block_size, num_layers=draft.num_layers,
                               mask_token_id=mask_token_id, markov_rank=markov_rank,
                               markov_head_type=markov_type, confidence_head=confidence,
                               confidence_with_markov=with_markov, draft_vocab_size=None)
        config.check_fits(target)
    except ValueError as e:
        raise CheckpointError(f"{source}: invalid drafter config: {e}") from e
    return config


def load_deepspec_config(path: str | os.PathLike, target: TransformerConfig) -> DrafterConfig:
    """`drafter_config_from_deepspec` of `path/config.json`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: drafter directory not found")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: file not found ({CONFIG_FILE} is required in a DeepSpec "
                              "drafter directory)")
    return drafter_config_from_deepspec(read_json(config_path), target, source=config_path)


def deepspec_expected_shapes(config: DrafterConfig, target: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """DeepSpec tensor name → torch-layout shape for every tensor the drafter loads (frozen copies excluded)."""
    d, v, r = target.hidden_size, target.vocab_size, config.markov_rank
    layer_cfg = draft_layer_config(target, config.num_layers)
    shapes = {"fc.weight": (d, len(config.target_layer_ids) * d), "hidden_norm.weight": (d,)}
    shapes.update({n: s for n, s in expected_shapes(layer_cfg).items() if n.startswith("layers.")})
    shapes["norm.weight"] = (d,)
    if r:
        shapes["markov_head.markov_w1.weight"] = (v, r)
        shapes["markov_head.markov_w2.weight"] = (v, r)
        if config.markov_head_type == "gated":
            shapes["markov_head.gate_proj.weight"] = (r, d + r)
            shapes["markov_head.gate_proj.bias"] = (r,)
        elif config.markov_head_type == "rnn":
            shapes["markov_head.joint_proj.weight"] = (3 * r, 2 * r + d)
            shapes["markov_head.joint_proj.bias"] = (3 * r,)
    if config.confidence_head:
        shapes["confidence_head.proj.weight"] = (1, d + (r if config.uses_confidence_markov_input else 0))
        shapes["confidence_head.proj.bias"] = (1,)
    return shapes


_VOCAB_TENSORS = FROZEN_COPIES + ("markov_head.markov_w1.weight", "markov_head.markov_w2.weight")


def _shape_problem(name: str, want: tuple[int, ...], got: tuple[int, ...]) -> str:
    msg = f"{name} expected {want} got {got}"
    if name in _VOCAB_TENSORS and len(got) == 2 and got[0] != want[0]:
        msg += f" (vocabulary mismatch: {got[0]} rows, the target vocabulary has {want[0]})"
    return msg


def _pure_dict(config: DrafterConfig, target: TransformerConfig, t: Mapping[str, np.ndarray]) -> dict:
    """The drafter's nested state (all variables, non-Param ones included) from DeepSpec tensors."""
    layer_cfg = dataclasses.replace(draft_layer_config(target, config.num_layers), tie_word_embeddings=True)
    # canonical_to_pure_dict maps the decoder layers and the final norm; the drafter has no embedding of
    # its own, so a placeholder stands in for it and is dropped.
    body = canonical_to_pure_dict(layer_cfg, {**t, "embed_tokens.weight": np.zeros((0,), np.float32)})
    d2t, t2d = build_maps(None, target.vocab_size)
    pure: dict[str, Any] = {
        "fc": t["fc.weight"].T, "hidden_norm": {"weight": t["hidden_norm.weight"]},
        "layers": body["layers"], "norm": body["norm"],
        "draft_to_target": np.asarray(d2t), "target_to_draft": np.asarray(t2d),
    }
    if config.markov_rank:
        markov = {"w1": t["markov_head.markov_w1.weight"], "w2": t["markov_head.markov_w2.weight"].T}
        if config.markov_head_type == "gated":
            markov.update(gate_w=t["markov_head.gate_proj.weight"].T, gate_b=t["markov_head.gate_proj.bias"])
        elif config.markov_head_type == "rnn":
            markov.update(joint_w=t["markov_head.joint_proj.weight"].T, joint_b=t["markov_head.joint_proj.bias"])
        pure["markov"] = markov
    if config.confidence_head:
        pure["confidence"] = {"w": t["confidence_head.proj.weight"][0], "b": t["confidence_head.proj.bias"][0],
                              "temperatures": np.ones((config.block_size,), np.float32),
                              "biases": np.zeros((config.block_size,), np.float32),
                              "calibrated_at": np.zeros((1,), np.float32)}
    return pure


def _check_frozen_copies(entries, target_model, described: str) -> None:
    """The checkpoint's embed_tokens / lm_head copies must equal the target's (within bf16 rounding)."""
    present = {n: entries[n] for n in FROZEN_COPIES if n in entries}
    if not present:
        return
    arrays = read_tensors(present)
    refs = {"embed_tokens.weight": lambda: target_model.embed_tokens[...],
            "lm_head.weight": lambda: draft_head_matrix(target_model, None, True)}
    for name, value in arrays.items():
        ref = np.asarray(refs[name](), np.float32)
        rows = 4096
        for start in range(0, ref.shape[0], rows):
            a, b = value[start:start + rows], ref[start:start + rows]
            if not np.allclose(a, b, rtol=_COPY_RTOL, atol=1e-6):
                row = start + int(np.argmax(~np.isclose(a, b, rtol=_COPY_RTOL, atol=1e-6).all(1)))
                raise DrafterMismatchError(
                    f"{described}: {name} differs from the target's "
                    f"{'input embedding' if name.startswith('embed') else 'output head'} (first at row {row}); "
                    "the drafter was trained against a different target checkpoint")


def _cast_like(abstract: jax.ShapeDtypeStruct, value: np.ndarray) -> jax.Array:
    if tuple(abstract.shape) != tuple(np.shape(value)):  # a mapping bug, not a user error
        raise RuntimeError(f"DeepSpec loader: tensor of shape {np.shape(value)} for a drafter variable of "
                           f"shape {abstract.shape}")
    return jnp.asarray(value, dtype=abstract.dtype)


def load_deepspec_drafter(path: str | os.PathLike, target: TransformerConfig, dtype=jnp.float32, *,
                          target_model=None) -> DSparkDrafter:
    """Loads a DeepSpec DSpark/DFlash drafter directory into a full-vocabulary `DSparkDrafter` for `target`.

    Every tensor the drafter needs must be present with exactly the expected torch-layout shape; tensors
    it would not use are an error. The frozen `embed_tokens` / `lm_head` copies are shape-checked; with
    `target_model` (the loaded target `Transformer`) they are also compared with the target's weights.
    Confidence-head temperatures start at 1 (uncalibrated). Raises `CheckpointError` for missing /
    truncated / corrupted files and `DrafterMismatchError` (a `CheckpointError`) when the drafter does not
    fit `target`.
    """
    path = os.fspath(path)
    config = load_deepspec_config(path, target)
    described, entries = checkpoint_entries(path)
    expected = deepspec_expected_shapes(config, target)
    copy_shape = (target.vocab_size, target.hidden_size)
    frozen_wrong = [_shape_problem(n, copy_shape, entries[n].shape) for n in FROZEN_COPIES
                    if n in entries and entries[n].shape != copy_shape]
    wrong = [_shape_problem(n, expected[n], entries[n].shape) for n in expected
             if n in entries and entries[n].shape != expected[n]]
    if frozen_wrong or wrong:
        raise DrafterMismatchError(f"{described}: {len(frozen_wrong) + len(wrong)} tensor(s) do not fit the "
                                   f"target {target.name or target.family} (vocab {target.vocab_size}, hidden "
                                   f"{target.hidden_size}): {listing(frozen_wrong + wrong)}")
    problems = []
    missing = [n for n in expected if n not in entries]
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {listing(missing)}")
    unexpected = sorted(n for n in entries if n not in expected and n not in FROZEN_COPIES)
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {listing(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{described}: checkpoint does not match its config ({config.algorithm}, {config.num_layers} "
            f"layers, markov_rank {config.markov_rank} {config.markov_head_type}, confidence head "
            f"{config.confidence_head}): " + " | ".join(problems))
    if target_model is not None:
        _check_frozen_copies(entries, target_model, described)

    tensors = read_tensors({n: entries[n] for n in expected})
    abstract = nnx.eval_shape(lambda: DSparkDrafter(config, target, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = _pure_dict(config, target, tensors)
    pure = jax.tree.map(_cast_like, nnx.to_pure_dict(state), pure)
    nnx.replace_by_pure_dict(state, pure)
    leftover = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(state)
                if isinstance(x, jax.ShapeDtypeStruct)]
    if leftover:  # a drafter variable the mapping above does not know (DSparkDrafter changed)
        raise RuntimeError(f"DeepSpec loader left drafter variables unset: {leftover}")
    return nnx.merge(graphdef, state)

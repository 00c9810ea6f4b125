"""The drafter-training target cache's on-disk format: target features precomputed once (`cache_builder`), read
back through memory maps (`target_cache`).

Layout of a cache directory (format version 1)::

    manifest.json            written LAST and atomically: a directory without it is an unfinished build
    shard-00000/             one directory per shard, written as `shard-00000.tmp/` and renamed when complete
        shard.json           what the shard holds (sample range, token count, digest of its sequences, settings)
        offsets.npy          int64  [n_samples + 1]  token offsets of the shard's samples (offsets[0] = 0)
        tokens.npy           int32  [N]              prompt + response token ids of all samples, concatenated
        loss_mask.npy        uint8  [N]              1 on response tokens (the supervised ones)
        features.npy         [N, m*d]  raw outputs of the m tapped layers, concatenated in layer-id order
                                       (id -1 = the scaled embedding output)
        last_hidden.npy      [N, d]    the target's final-normed last hidden state
        target_lse.npy       float32 [N]  log-sum-exp of the target's full-vocabulary (soft-capped) logits
                                          where loss_mask == 1, else 0
    shard-00001/ ...

`features` and `last_hidden` are float32, or bfloat16 stored as raw uint16 bits (numpy has no bfloat16):
decode with `decode_bf16` (`utils.bfloat16`). float16 is refused: Gemma's
residual stream reaches ~8e4, past float16's 65504.

A "sequences" cache (`build_sequence_cache`, for online training where the trainer runs the target itself)
has the same layout without `features`, `last_hidden` and `target_lse`.

Resume: the shard split is a pure function of the sequence lengths and `shard_max_tokens` (`plan_shards`),
so a rerun with the same sequences and settings re-derives the same shards. Every finished shard directory
carries a `shard.json` with a digest of its sequences and the cache settings; a rerun skips the shards whose
`shard.json` matches, deletes leftover `*.tmp` directories, recomputes the missing shards and writes the
manifest. A finished shard that does not match (other sequences, target, layers, dtype or shard size) is an
error rather than silently overwritten.
"""
from __future__ import annotations


import numpy as np

from dspark_jax.utils.bfloat16 import bits_to_float32, from_bits

CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_META_NAME = "shard.json"
CACHE_DTYPES = ("bfloat16", "float32")
KIND_FEATURES = "features"
KIND_SEQUENCES = "sequences"
SEQUENCE_FIELDS = ("tokens", "loss_mask")
FEATURE_FIELDS = ("features", "last_hidden", "target_lse")
STORAGE_DTYPES = {"bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32)}


def check_cache_dtype(dtype: str) -> str:
    if dtype in ("float16", "half", "fp16"):
        raise ValueError("cache dtype float16 is not supported: target hidden states reach ~8e4 (Gemma), beyond "
                         "float16's maximum of 65504; use bfloat16 or float32")
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"unknown cache dtype {dtype!r}; choose from {', '.join(CACHE_DTYPES)}")
    return dtype


def estimate_cache_bytes(num_tokens: int, num_layers: int, hidden: int, dtype: str = "bfloat16") -> int:
    """Bytes of a feature cache: per token m*d features + d last hidden (in `dtype`), plus int32 token,
    uint8 mask and float32 log-sum-exp. `num_layers` = the number of TAPPED layers m."""
    item = STORAGE_DTYPES[check_cache_dtype(dtype)].itemsize
    return int(num_tokens) * ((num_layers + 1) * hidden * item + 4 + 1 + 4)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def describe_cache_size(num_tokens: int, num_layers: int, hidden: int, dtype: str = "bfloat16") -> str:
    """One line for humans, e.g. `target cache: 1,000 tokens x (5 tapped layers + last hidden) x 640 x
    bfloat16 = 7.3 MiB (7,689 bytes/token)`."""
    total = estimate_cache_bytes(num_tokens, num_layers, hidden, dtype)
    per = total // max(int(num_tokens), 1)
    return (f"target cache: {num_tokens:,} tokens x ({num_layers} tapped layers + last hidden) x {hidden} x {dtype} "
            f"= {format_bytes(total)} ({per:,} bytes/token)")


def config_fingerprint(config) -> str:
    """The target's identity (`TransformerConfig.fingerprint`: fields except the display name, so the same
    model loaded from a GGUF or a Hugging Face directory matches). Weights are not fingerprinted."""
    return config.fingerprint()


def decode_bf16(u16: np.ndarray) -> np.ndarray:
    """bfloat16 stored as raw uint16 bits -> float32 (exact)."""
    return bits_to_float32(u16)


def decode_stored(a: np.ndarray, dtype: str, as_float32: bool) -> np.ndarray:
    """A stored features / last_hidden array as float32, or as ml_dtypes.bfloat16 (bfloat16 cache, as_float32
    False)."""
    if dtype == "float32":
        return np.asarray(a, np.float32)
    return decode_bf16(a) if as_float32 else from_bits(a)

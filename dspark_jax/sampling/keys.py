"""Per-request random keys: every random draw of a request comes from its own key, so its tokens do not
depend on which other requests share its batch (OpenAI's `seed`).

A request's key comes from its seed and its prompt (`request_key`: the same prompt and seed give the same key;
different prompts under one seed get independent streams); the draws at a step are keyed by (request key,
position of the anchor — the newest committed token —, purpose: a token sampled from the target alone, the
drafts, the verification), so they depend on where in its sequence the request is, not on the other requests
or on how many steps they took.

Determinism across batches holds for plain decoding and for draft policies whose draft lengths are decided per
request (fixed γ, confidence threshold, the jitted loop's covering width at batch 1). A batch-level choice —
the engine's hardware-aware scheduler, or a verification width shared by a batch — changes how many of a
request's drafts are verified, and with it the path its rejection sampling takes: its tokens are then still
exact samples of the target, but not the same ones as alone.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import jax
import jax.numpy as jnp

SAMPLE, DRAFT, VERIFY = 0, 1, 2  # purposes of the draws made at one anchor position


def row_keys(key: jax.Array, batch: int) -> jax.Array:
    """[B] keys, one per row: a batch of keys [B] as given; one key split into `batch` (then the draws depend
    on the batch). Keys are typed (`jax.random.key`); raw uint32 keys are wrapped."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.random.split(key, batch)
    if key.shape != (batch,):
        raise ValueError(f"expected one key or {batch} keys, got keys of shape {key.shape}")
    return key


def request_key_data(seed: int, prompt_ids: Sequence[int]) -> tuple[int, int]:
    """Host side: (seed word, prompt hash) of a request — any integer seed (folded to 32 bits) and the CRC-32
    of its prompt ids."""
    seed = int(seed)
    word = (seed ^ (seed >> 32) ^ (seed >> 64)) & 0xFFFFFFFF
    return word, zlib.crc32(b"".join(int(t).to_bytes(4, "little", signed=True) for t in prompt_ids))


def request_keys(data) -> jax.Array:
    """[B] request keys from `request_key_data` rows ([B, 2] uint32-valued)."""
    data = jnp.asarray(data, jnp.uint32).reshape(-1, 2)
    return jax.vmap(lambda d: jax.random.fold_in(jax.random.key(d[0]), d[1]))(data)


def position_keys(keys: jax.Array, position: jax.Array, purpose: int) -> jax.Array:
    """[B] keys for the draws of `purpose` at per-request positions [B] (e.g. the anchor's position)."""
    position = jnp.broadcast_to(jnp.asarray(position, jnp.int32), keys.shape)
    return jax.vmap(lambda k, p: jax.random.fold_in(jax.random.fold_in(k, p), purpose))(keys, position)


def split_rows(keys: jax.Array, num: int) -> jax.Array:
    """[B, num] keys: each row's key split into `num` (e.g. one per draft position)."""
    return jax.vmap(lambda k: jax.random.split(k, num))(keys)

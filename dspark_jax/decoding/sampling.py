"""Per-request sampling: temperature, top-k, top-p, greedy at temperature 0.

`filter_logits` is the one transform applied to every distribution that is sampled from or compared
(target and draft alike), so acceptance ratios are computed on exactly the sampled distributions.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request arrays of shape [B]. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @staticmethod
    def create(batch_size: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> "SamplingParams":
        validate_sampling(temperature, top_k, top_p)
        return SamplingParams(temperature=jnp.full((batch_size,), temperature, jnp.float32),
                              top_k=jnp.full((batch_size,), top_k, jnp.int32),
                              top_p=jnp.full((batch_size,), top_p, jnp.float32))


@dataclasses.dataclass(frozen=True)
class FilterMode:
    """Static (compile-time) description of which filters any request in the batch uses."""
    max_top_k: int = 0      # > 0: top-k via lax.top_k with this many candidates
    top_p: bool = False     # nucleus filtering for some request
    all_top_k: bool = False  # every request uses top-k: nucleus needs only the top max_top_k candidates

    @staticmethod
    def for_params(top_k: np.ndarray | int, top_p: np.ndarray | float) -> "FilterMode":
        top_k, top_p = np.asarray(top_k), np.asarray(top_p)
        return FilterMode(max_top_k=int(top_k.max(initial=0)), top_p=bool((top_p < 1.0).any()),
                          all_top_k=bool((top_k > 0).all()))


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def filter_logits(logits: jax.Array, params: SamplingParams, mode: FilterMode) -> jax.Array:
    """Float32 logits / temperature with tokens outside top-k / top-p set to -inf. logits: [B, V]."""
    temp = jnp.maximum(params.temperature, 1e-6)[:, None]
    x = logits.astype(jnp.float32) / temp
    if mode.top_p and not (mode.all_top_k and mode.max_top_k):
        sorted_desc = -jnp.sort(-x, axis=-1)  # a request without top-k needs the full order for its nucleus
    elif mode.max_top_k:
        sorted_desc = jax.lax.top_k(x, min(mode.max_top_k, x.shape[-1]))[0]
    else:
        return x
    if mode.max_top_k or mode.top_p:
        k = params.top_k
        kth = jnp.take_along_axis(sorted_desc, jnp.clip(k - 1, 0, sorted_desc.shape[-1] - 1)[:, None], axis=-1)
        kth = jnp.where((k > 0)[:, None], kth, _NEG_INF)
        if mode.top_p:
            kept = jnp.where(sorted_desc >= kth, sorted_desc, _NEG_INF)
            probs = jax.nn.softmax(kept, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate
            in_nucleus = (before < params.top_p[:, None]) & (kept > _NEG_INF)
            pth = jnp.min(jnp.where(in_nucleus, sorted_desc, jnp.inf), axis=-1, keepdims=True)
            kth = jnp.maximum(kth, pth)
        x = jnp.where(x >= kth, x, _NEG_INF)
    return x


def token_probs(logits: jax.Array, params: SamplingParams, mode: FilterMode) -> jax.Array:
    """The distribution a token is drawn from: softmax of the filtered logits, one-hot argmax if greedy."""
    probs = jax.nn.softmax(filter_logits(logits, params, mode), axis=-1)
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where((params.temperature == 0)[:, None], greedy, probs)


def sample(key: jax.Array, logits: jax.Array, params: SamplingParams, mode: FilterMode) -> jax.Array:
    """One token per request [B] int32."""
    drawn = jax.random.categorical(key, filter_logits(logits, params, mode), axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    return jnp.where(params.temperature == 0, greedy, drawn).astype(jnp.int32)

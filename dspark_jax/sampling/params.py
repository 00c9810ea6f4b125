"""Per-request sampling settings: the arrays every sampled or compared distribution is filtered with, and the
temperature scaling they share (bit-identical wherever it is computed)."""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


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

    @staticmethod
    def for_run(temperature: float, top_k: np.ndarray | int, top_p: np.ndarray | float) -> "FilterMode":
        """The filters a run compiles: `for_params` when it samples (temperature > 0), none when greedy."""
        return FilterMode.for_params(top_k, top_p) if temperature > 0 else FilterMode()


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def inverse_temperature(temperature: jax.Array) -> jax.Array:
    """1 / temperature per request (0 is clamped to 1e-6)."""
    return 1.0 / jnp.maximum(temperature.astype(jnp.float32), 1e-6)


def scale_logits(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """Float32 logits · (1 / temperature) (temperature [B] broadcast over the trailing axes), rounded to float32
    (−inf becomes −FLT_MAX, which has probability 0 all the same).

    The same bits wherever it is computed (thresholds, gathers, full rows, dense or lazy): a multiplication by
    an explicit reciprocal, because XLA:CPU rewrites a division by a broadcast row value into exactly this but
    divides same-shaped operands (a gathered logit); and a max with −FLT_MAX after it, because XLA may
    otherwise contract the product into a following subtraction (x − max inside a softmax) as one FMA,
    skipping the rounding of x in some fusions and not in others."""
    inv = inverse_temperature(temperature)
    x = logits.astype(jnp.float32) * inv[(...,) + (None,) * (logits.ndim - inv.ndim)]
    return jnp.maximum(x, jnp.finfo(jnp.float32).min)


def check_batch(prompts: jax.Array, prompt_lens: jax.Array, params: SamplingParams) -> None:
    """Shape / dtype checks at a decoding loop's jit boundary (chex; evaluated while tracing, free at run time):
    prompts int [B, P], prompt_lens int [B], one temperature / top_k / top_p per request. AssertionError naming the
    mismatch otherwise."""
    chex.assert_rank(prompts, 2)
    chex.assert_type([prompts, prompt_lens], int)
    batch = prompts.shape[0]
    chex.assert_shape([prompt_lens, params.temperature, params.top_k, params.top_p], (batch,))

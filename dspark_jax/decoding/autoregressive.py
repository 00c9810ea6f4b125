"""Plain autoregressive decoding: one jitted, fully on-device `lax.while_loop` over a batch of prompts.

This is the baseline speculative decoding must beat.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.models.kv_cache import init_cache
from dspark_jax.sampling import FilterMode, SamplingParams, check_batch, sample
from dspark_jax.sampling.keys import SAMPLE, position_keys, row_keys


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """tokens: [B, max_new_tokens] (pad_id after the end); num_tokens: [B] committed tokens (a final
    stop token included)."""
    tokens: jax.Array
    num_tokens: jax.Array


def prefill(model, prompts: jax.Array, prompt_lens: jax.Array, cache_len: int, tap_layers: tuple[int, ...] = ()):
    """Runs right-padded prompts [B, P] through the model. Returns (last-position logits [B, V], output)."""
    b, p = prompts.shape
    cache = init_cache(model.config, b, cache_len, model.dtype)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
    out = model(prompts, positions, cache, jnp.zeros((b,), jnp.int32), tap_layers=tap_layers)
    last = jnp.take_along_axis(out.hidden, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), out


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "stop_ids", "mode", "pad_id"))
def generate(graphdef: nnx.GraphDef, state: nnx.State, prompts: jax.Array, prompt_lens: jax.Array,
             key: jax.Array, params: SamplingParams, *, max_new_tokens: int, stop_ids: tuple[int, ...],
             mode: FilterMode = FilterMode(), pad_id: int = 0) -> GenerateOutput:
    """Generates exactly `max_new_tokens` per request, or fewer up to and including a stop token.

    prompts: [B, P] right-padded int32; prompt_lens: [B] (1 <= len <= P). key: one per request [B] (its tokens
    then do not depend on the rest of the batch: `sampling.keys`) or one for the batch.
    """
    check_batch(prompts, prompt_lens, params)
    model = nnx.merge(graphdef, state)
    b, p = prompts.shape
    cache_len = p + max_new_tokens
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    keys = row_keys(key, b)
    logits, out = prefill(model, prompts, prompt_lens, cache_len)
    first = sample(position_keys(keys, prompt_lens - 1, SAMPLE), logits, params, mode)
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stops)

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, prev, tokens, done, cache, keys = carry
        pos = (prompt_lens + step - 1)[:, None]  # the anchor's position
        o = model(prev[:, None], pos, cache, pos[:, 0])
        nxt = sample(position_keys(keys, pos[:, 0], SAMPLE), model.logits(o.hidden[:, 0]), params, mode)
        nxt = jnp.where(done, pad_id, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        return step + 1, nxt, tokens, done | jnp.isin(nxt, stops), o.cache, keys

    carry = (jnp.int32(1), first, tokens, done, out.cache, keys)
    _, _, tokens, _, _, _ = jax.lax.while_loop(cond, body, carry)
    is_stop = jnp.isin(tokens, stops)
    first_stop = jnp.where(is_stop.any(axis=1), jnp.argmax(is_stop, axis=1) + 1, max_new_tokens)
    return GenerateOutput(tokens=tokens, num_tokens=first_stop.astype(jnp.int32))

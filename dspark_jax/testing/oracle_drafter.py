"""A test drafter that proposes with the target itself: every proposal must be accepted, so the loop's
bookkeeping (rounds, commits, rollback, stop tokens, budget) can be checked exactly."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.sampling.keys import row_keys, split_rows
from dspark_jax.sampling import sample, token_probs
from dspark_jax.drafters.base import Proposal
from dspark_jax.models.kv_cache import init_cache


@dataclasses.dataclass(frozen=True)
class OracleConfig:
    block_size: int
    target_layer_ids: tuple[int, ...] = (0,)


class OracleDrafter(nnx.Module):
    def __init__(self, block_size: int, vocab_size: int):
        self.config = OracleConfig(block_size)
        self.vocab_size = vocab_size
        self.full_vocab = True

    def head_matrix(self, target_model):
        return jnp.zeros((1, 1))

    def head_rows(self, target_model):
        return self.head_matrix(target_model)

    def init_state(self, batch, max_len):
        return None

    def prefill(self, target_model, state, features, prompts, prompt_lens):
        b, p = prompts.shape
        cache = init_cache(target_model.config, b, p + 256, target_model.dtype)
        pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
        return target_model(prompts, pos, cache, jnp.zeros((b,), jnp.int32)).cache

    def propose(self, target_model, cache, anchor, start, key, params, mode, head):
        keys = jnp.swapaxes(split_rows(row_keys(key, anchor.shape[0]), self.config.block_size), 0, 1)  # [G, B]

        def step(carry, k):
            cache, tok, pos = carry
            out = target_model(tok[:, None], pos[:, None], cache, pos)
            logits = target_model.logits(out.hidden[:, 0])
            nxt = sample(keys[k], logits, params, mode)
            return (out.cache, nxt, pos + 1), (nxt, token_probs(logits, params, mode))

        _, (toks, p) = jax.lax.scan(step, (cache, anchor, start), jnp.arange(self.config.block_size))
        toks, p = jnp.swapaxes(toks, 0, 1), jnp.swapaxes(p, 0, 1)
        ones = jnp.ones(toks.shape, jnp.float32)
        return Proposal(tokens=toks, draft_index=toks, p_draft=p, confidence=ones, confidence_logits=ones)

    def commit(self, target_model, cache, features, verified, start, count, outcome=None):
        """Re-run the verified tokens so the oracle's own cache holds the committed prefix."""
        out = target_model(verified, start[:, None] + jnp.arange(verified.shape[1])[None], cache, start)
        return out.cache

"""Eagle3 (spec §1.10): the one-layer autoregressive baseline drafter.

Input at position i is the pair (hidden_i, token_{i+1}): hidden_i = fc(target features at i) for committed
context, or the drafter's own previous output hidden while drafting. q/k/v read
[input_layernorm(embed(token)); hidden_norm(hidden)] (2d); the residual stream is the un-normed hidden.
With a single layer, a position's K/V depend only on its own inputs, so committed context is written in
parallel. Draft layers use the target family's norm and MLP activation.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.drafters.base import DrafterBase, Proposal, RoundOutcome, draft_layer_config, softcap
from dspark_jax.drafters.config import DrafterConfig
from dspark_jax.models.config import TransformerConfig
from dspark_jax.models.kv_cache import KVCache, write_contiguous
from dspark_jax.models.layers import MLP, Attention, RMSNorm, param, apply_rope, rope_inv_freq
from dspark_jax.models.output_head import HeadRows, head_logits
from dspark_jax.sampling import FilterMode, SamplingParams, sample, token_probs
from dspark_jax.sampling.keys import row_keys, split_rows
from pallas_kernels import attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Eagle3State:
    """cache: the layer's K/V (valid below anchor position - 1); pending: target features [B, m·d] at the
    position just before the anchor, paired with the anchor in the next round's first step."""
    cache: KVCache
    pending: jax.Array


class Eagle3Drafter(DrafterBase):
    def __init__(self, config: DrafterConfig, target: TransformerConfig, *, dtype=jnp.float32,
                 rngs: nnx.Rngs, draft_vocab_ids: np.ndarray | None = None):
        self._init_common(config, target, dtype, draft_vocab_ids)
        d = target.hidden_size
        gemma = target.family == "gemma3"
        self.layer_config = draft_layer_config(target, 1)
        c = self.layer_config
        self.fc = param(rngs, (len(config.target_layer_ids) * d, d), ("features", "embed"), dtype)
        self.hidden_norm = RMSNorm(d, target.rms_norm_eps, gemma, dtype)
        self.input_layernorm = RMSNorm(d, target.rms_norm_eps, gemma, dtype)
        self.self_attn = Attention(c, 0, dtype, rngs)
        self.self_attn.q_proj = param(rngs, (2 * d, c.num_heads * c.head_dim), ("embed", "heads"), dtype)
        self.self_attn.k_proj = param(rngs, (2 * d, c.num_kv_heads * c.head_dim), ("embed", "kv_heads"), dtype)
        self.self_attn.v_proj = param(rngs, (2 * d, c.num_kv_heads * c.head_dim), ("embed", "kv_heads"), dtype)
        self.post_attention_layernorm = RMSNorm(d, target.rms_norm_eps, gemma, dtype)
        self.mlp = MLP(c, dtype, rngs)
        self.norm = RMSNorm(d, target.rms_norm_eps, gemma, dtype)

    def init_state(self, batch: int, max_len: int) -> Eagle3State:
        c = self.layer_config
        shape = (batch, max_len, c.num_kv_heads, c.head_dim)
        feat = len(self.config.target_layer_ids) * self.target_config.hidden_size
        return Eagle3State(KVCache((jnp.zeros(shape, self.dtype),), (jnp.zeros(shape, self.dtype),)),
                           jnp.zeros((batch, feat), self.dtype))

    def _inputs(self, target_model, hidden: jax.Array, tokens: jax.Array) -> jax.Array:
        e = self.input_layernorm(target_model.embed(tokens).astype(self.dtype))
        return jnp.concatenate([e, self.hidden_norm(hidden)], axis=-1)

    def _write_pairs(self, target_model, cache: KVCache, features: jax.Array, next_tokens: jax.Array,
                     start: jax.Array) -> KVCache:
        """K/V of pairs (features at start+j, token at start+j+1) for j = 0..T-1."""
        hidden = features.astype(self.dtype) @ self.fc[...]
        pos = start[:, None] + jnp.arange(features.shape[1], dtype=jnp.int32)[None]
        k, v = self.self_attn.project_kv(self._inputs(target_model, hidden, next_tokens), pos)
        return KVCache((write_contiguous(cache.k[0], k, start),), (write_contiguous(cache.v[0], v, start),))

    def prefill(self, target_model, state: Eagle3State, features: jax.Array, prompts: jax.Array,
                prompt_lens: jax.Array) -> Eagle3State:
        """Pairs (prompt features i, prompt token i+1); the last prompt position's features become pending."""
        nxt = jnp.concatenate([prompts[:, 1:], prompts[:, -1:]], axis=1)
        cache = self._write_pairs(target_model, state.cache, features, nxt, jnp.zeros((prompts.shape[0],), jnp.int32))
        return self.set_pending(Eagle3State(cache, state.pending), features, prompt_lens - 1)

    def set_pending(self, state: Eagle3State, features: jax.Array, index: jax.Array) -> Eagle3State:
        pending = jnp.take_along_axis(features, index[:, None, None], axis=1)[:, 0]
        return Eagle3State(state.cache, pending.astype(self.dtype))

    def commit(self, target_model, state: Eagle3State, features: jax.Array, verified: jax.Array,
               start: jax.Array, count: jax.Array, outcome: RoundOutcome | None = None) -> Eagle3State:
        """Pairs (pending, anchor) at start-1 and (features[j], verified[j+1]) at start+j; only those below the
        next anchor's position - 1 stay valid. The last committed position's features become pending."""
        feats = jnp.concatenate([state.pending[:, None].astype(features.dtype), features[:, :-1]], axis=1)
        cache = self._write_pairs(target_model, state.cache, feats, verified, start - 1)
        return self.set_pending(Eagle3State(cache, state.pending), features, jnp.maximum(count - 1, 0))

    def _step(self, target_model, cache: KVCache, hidden: jax.Array, token: jax.Array, pos: jax.Array):
        """One autoregressive step at positions pos [B]: returns (output hidden [B, d], updated cache)."""
        x_in = self._inputs(target_model, hidden[:, None], token[:, None])
        a = self.self_attn
        b = token.shape[0]
        q = (x_in @ a.q_proj[...]).reshape(b, 1, a.num_heads, a.head_dim)
        q = apply_rope(a.q_norm(q), pos[:, None], rope_inv_freq(a.head_dim, a.rope_theta, a.rope_scaling))
        k, v = a.project_kv(x_in, pos[:, None])
        ck, cv = write_contiguous(cache.k[0], k, pos), write_contiguous(cache.v[0], v, pos)
        out = attention(q, ck, cv, pos[:, None], scale=a.scale, impl=self.attn_impl).reshape(b, 1, -1) @ a.o_proj[...]
        x = hidden[:, None] + out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x[:, 0], KVCache((ck,), (cv,))

    def propose(self, target_model, state: Eagle3State, anchor: jax.Array, start: jax.Array, key: jax.Array,
                params: SamplingParams, mode: FilterMode, head: HeadRows | jax.Array) -> Proposal:
        g = self.config.block_size
        keys = jnp.swapaxes(split_rows(row_keys(key, anchor.shape[0]), g), 0, 1)  # [G, B]: per request
        hidden0 = state.pending @ self.fc[...]

        def step(carry, inputs):
            cache, hidden, token = carry
            k, key_k = inputs
            out, cache = self._step(target_model, cache, hidden, token, start - 1 + k)
            logits = softcap(head_logits(self.norm(out), head),
                             self.target_config.final_logit_softcapping)
            idx = sample(key_k, logits, params, mode)
            tok = jnp.take(self.draft_to_target[...], idx, axis=0)
            return (cache, out, tok), (idx, tok, token_probs(logits, params, mode))

        _, (idx, toks, p) = jax.lax.scan(step, (state.cache, hidden0, anchor), (jnp.arange(g), keys))
        idx, toks, p = jnp.swapaxes(idx, 0, 1), jnp.swapaxes(toks, 0, 1), jnp.swapaxes(p, 0, 1)
        ones = jnp.ones(idx.shape, jnp.float32)
        return Proposal(tokens=toks, draft_index=idx, p_draft=p, confidence=ones, confidence_logits=0 * ones)

"""The DSpark drafter (spec §1.2–1.7): target features → fc + RMSNorm → K/V injected into every draft
layer; one parallel pass over [anchor, MASK × (γ-1)]; then the sequential Markov head samples left to
right and the confidence head scores each slot. DFlash is this module with both heads off.

With `lookup_inputs` (our deviation, see `DrafterConfig`) block slot k's input also holds lookup_fc(e(l_k)),
l_k the token a prompt lookup over the committed text proposes for the position slot k predicts (MASK where
nothing matches); the drafter state then also keeps the committed tokens (`LookupState`)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.drafters.base import DrafterBase, Proposal, RoundOutcome, draft_layer_config, softcap
from dspark_jax.drafters.config import DrafterConfig
from dspark_jax.drafters.heads import ConfidenceHead, MarkovHead
from dspark_jax.drafters.ngram import find_match, lookup_proposal
from dspark_jax.models.config import TransformerConfig
from dspark_jax.models.kv_cache import KVCache, write_contiguous
from dspark_jax.models.layers import DecoderLayer, RMSNorm, param
from dspark_jax.models.output_head import HeadRows, head_logits
from dspark_jax.sampling import FilterMode, SamplingParams, sample, token_probs
from dspark_jax.sampling.keys import row_keys, split_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LookupState:
    """Drafter state with lookup inputs: cache (context K/V of every draft layer) and tokens [B, L], the
    committed tokens by position (entries at or past the anchor are stale)."""
    cache: KVCache
    tokens: jax.Array


def context_cache(state) -> KVCache:
    """The context K/V of a DSpark drafter state (a KVCache, or a LookupState's cache)."""
    return state.cache if isinstance(state, LookupState) else state


def lookup_inputs(tokens: jax.Array, last: jax.Array, n_max: int, gamma: int, mask_token_id: int) -> jax.Array:
    """[B, γ] tokens a lookup (last n_max..1 tokens, see `drafters.ngram`) proposes after position `last` of
    tokens [B, L]; mask_token_id where nothing matches."""
    end, n = find_match(tokens, last, n_max, 1)
    return jnp.where((n > 0)[:, None], lookup_proposal(tokens, last, end, gamma), mask_token_id)


class DSparkDrafter(DrafterBase):
    def __init__(self, config: DrafterConfig, target: TransformerConfig, *, dtype=jnp.float32,
                 rngs: nnx.Rngs, draft_vocab_ids: np.ndarray | None = None):
        self._init_common(config, target, dtype, draft_vocab_ids)
        d = target.hidden_size
        self.layer_config = draft_layer_config(target, config.num_layers)
        self.fc = param(rngs, (len(config.target_layer_ids) * d, d), ("features", "embed"), dtype)
        self.hidden_norm = RMSNorm(d, target.rms_norm_eps, target.family == "gemma3", dtype)
        self.layers = nnx.List([DecoderLayer(self.layer_config, i, dtype, rngs) for i in range(config.num_layers)])
        self.norm = RMSNorm(d, target.rms_norm_eps, target.family == "gemma3", dtype)
        if config.lookup_inputs:  # zero-initialised: training starts from the paper's drafter
            self.lookup_fc = nnx.Param(jnp.zeros((d, d), dtype), sharding_names=("embed", "embed"),
                                       eager_sharding=False)
        n = self.vocab_size
        self.markov = (MarkovHead(config.markov_head_type, n + (0 if self.full_vocab else 1), n, config.markov_rank,
                                  d, dtype, rngs) if config.markov_rank else None)
        conf_in = d + (config.markov_rank if config.uses_confidence_markov_input else 0)
        self.confidence = ConfidenceHead(conf_in, config.block_size, dtype, rngs) if config.confidence_head else None

    # ---- context (target features) -------------------------------------------------------------
    def init_state(self, batch: int, max_len: int) -> KVCache | LookupState:
        c = self.layer_config
        shape = (batch, max_len, c.num_kv_heads, c.head_dim)
        cache = KVCache(k=tuple(jnp.zeros(shape, self.dtype) for _ in self.layers),
                        v=tuple(jnp.zeros(shape, self.dtype) for _ in self.layers))
        if self.config.lookup_inputs:
            return LookupState(cache, jnp.zeros((batch, max_len), jnp.int32))
        return cache

    def context(self, features: jax.Array) -> jax.Array:
        """hidden_norm(fc(F)) for concatenated tapped target features F [B, T, m·d]."""
        return self.hidden_norm(features.astype(self.dtype) @ self.fc[...])

    def write_context(self, state: KVCache, features: jax.Array, start: jax.Array) -> KVCache:
        """Appends the K/V of target features at positions start..start+T-1 to every draft layer."""
        c = self.context(features)
        pos = start[:, None] + jnp.arange(features.shape[1], dtype=jnp.int32)[None]
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.project_kv(c, pos)
            ks.append(write_contiguous(state.k[i], k, start))
            vs.append(write_contiguous(state.v[i], v, start))
        return KVCache(tuple(ks), tuple(vs))

    def _with_tokens(self, state, tokens: jax.Array, start: jax.Array, cache: KVCache):
        """The new state: `cache`, and with lookup inputs tokens [B, W] written at positions start.."""
        if not isinstance(state, LookupState):
            return cache
        return LookupState(cache, write_contiguous(state.tokens, tokens, start))

    def prefill(self, target_model, state, features: jax.Array, prompts: jax.Array, prompt_lens: jax.Array):
        del target_model, prompt_lens
        zeros = jnp.zeros((features.shape[0],), jnp.int32)
        return self._with_tokens(state, prompts, zeros, self.write_context(context_cache(state), features, zeros))

    def commit(self, target_model, state, features: jax.Array, verified: jax.Array, start: jax.Array,
               count: jax.Array, outcome: RoundOutcome | None = None):
        """After verification: the verified positions' target features become context (only the first
        `count` are valid; the rest lie past the next anchor, are masked, and get overwritten)."""
        del target_model, count, outcome
        return self._with_tokens(state, verified, start, self.write_context(context_cache(state), features, start))

    def lookup_tokens(self, state, anchor: jax.Array, start: jax.Array) -> jax.Array | None:
        """[B, G] the lookup inputs after the anchor at position start (None without lookup inputs)."""
        if not isinstance(state, LookupState):
            return None
        tokens = state.tokens.at[jnp.arange(anchor.shape[0]), start].set(anchor.astype(jnp.int32))
        return lookup_inputs(tokens, start, self.config.lookup_inputs, self.config.block_size,
                             self.config.mask_token_id)

    # ---- block forward ---------------------------------------------------------------------------
    def backbone(self, target_model, anchor: jax.Array, start: jax.Array, state,
                 lookup: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states H [B, G, d] of the block [anchor, MASK × (G-1)] at positions start..
        (state: a context KVCache, or a LookupState whose lookup inputs are used unless `lookup` [B, G] is
        given)."""
        if isinstance(state, LookupState):
            lookup = self.lookup_tokens(state, anchor, start) if lookup is None else lookup
            state = state.cache
        b, g = anchor.shape[0], self.config.block_size
        tokens = jnp.concatenate([anchor[:, None], jnp.full((b, g - 1), self.config.mask_token_id, jnp.int32)], 1)
        pos = start[:, None] + jnp.arange(g, dtype=jnp.int32)[None]
        x = target_model.embed(tokens).astype(self.dtype)
        if self.config.lookup_inputs:
            x = x + target_model.embed(lookup[:, :g]).astype(self.dtype) @ self.lookup_fc[...]
        for i, layer in enumerate(self.layers):
            x = layer.wrap_attention(x, lambda h, i=i, layer=layer: layer.self_attn.forward_block(
                h, pos, state.k[i], state.v[i], start, self.attn_impl))
        return self.norm(x)

    def base_logits(self, hidden: jax.Array, head: HeadRows | jax.Array) -> jax.Array:
        """Logits [..., N] float32 of the final-normed hidden [..., d] through the draft vocabulary's output
        embedding rows head [N, d] (`head_matrix`, or `head_rows` with the target's int8 blocks:
        `models.output_head.head_logits` — off XLA:CPU's few-row GEMM cliff, through the int8 kernel where it
        runs), soft-capped."""
        return softcap(head_logits(hidden, head), self.target_config.final_logit_softcapping)

    def prev_rows(self, tokens: jax.Array) -> jax.Array:
        """Markov-embedding rows of previous (target-id) tokens."""
        return jnp.take(self.target_to_draft[...], tokens, axis=0)

    def propose(self, target_model, state: KVCache, anchor: jax.Array, start: jax.Array, key: jax.Array,
                params: SamplingParams, mode: FilterMode, head: HeadRows | jax.Array) -> Proposal:
        """Drafts G tokens: one parallel backbone pass, then left-to-right sampling with the Markov head,
        from exactly the distributions returned in `p_draft`."""
        hidden = self.backbone(target_model, anchor, start, state)
        base = self.base_logits(hidden, head)  # [B, G, N]
        b = anchor.shape[0]
        keys = jnp.swapaxes(split_rows(row_keys(key, b), self.config.block_size), 0, 1)  # [G, B]: per request

        def step(carry, inputs):
            prev_row, rnn_state = carry
            u_k, h_k, key_k = inputs
            logits = u_k
            if self.markov is not None:
                bias, rnn_state = self.markov.step(prev_row, h_k, rnn_state)
                logits = logits + bias
            p = token_probs(logits, params, mode)
            idx = sample(key_k, logits, params, mode)
            conf_in = h_k
            if self.confidence is not None and self.config.uses_confidence_markov_input:
                conf_in = jnp.concatenate([h_k, self.markov.embed_prev(prev_row)], -1)
            z = self.confidence.logit(conf_in) if self.confidence is not None else jnp.zeros((b,), jnp.float32)
            return (idx, rnn_state), (idx, p, z)

        rnn0 = self.markov.initial_state(b) if self.markov is not None else jnp.zeros((b, 1), jnp.float32)
        xs = (jnp.swapaxes(base, 0, 1), jnp.swapaxes(hidden, 0, 1), keys)
        _, (idx, p, z) = jax.lax.scan(step, (self.prev_rows(anchor), rnn0), xs)
        idx, p, z = jnp.swapaxes(idx, 0, 1), jnp.swapaxes(p, 0, 1), jnp.swapaxes(z, 0, 1)
        conf = (self.confidence.calibrated(z, params.temperature) if self.confidence is not None
                else jnp.ones_like(z))
        return Proposal(tokens=jnp.take(self.draft_to_target[...], idx, axis=0), draft_index=idx, p_draft=p,
                        confidence=conf, confidence_logits=z)

    def teacher_forced(self, hidden: jax.Array, base: jax.Array, prev_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Training: Markov-corrected logits [..., G, N] and confidence logits [..., G] with the ground-truth
        previous tokens prev_tokens [..., G] (target ids; slot 0's previous token is the anchor)."""
        lead, g = hidden.shape[:-2], hidden.shape[-2]
        h = hidden.reshape((-1, g, hidden.shape[-1]))
        u = base.reshape((-1, g, base.shape[-1]))
        rows = self.prev_rows(prev_tokens).reshape((-1, g))
        logits = u
        if self.markov is not None:
            def step(state, inp):
                prev_k, h_k = inp
                bias, state = self.markov.step(prev_k, h_k, state)
                return state, bias
            _, bias = jax.lax.scan(step, self.markov.initial_state(h.shape[0]),
                                   (jnp.swapaxes(rows, 0, 1), jnp.swapaxes(h, 0, 1)))
            logits = u + jnp.swapaxes(bias, 0, 1)
        if self.confidence is not None:
            conf_in = h
            if self.config.uses_confidence_markov_input:
                conf_in = jnp.concatenate([h, self.markov.embed_prev(rows).astype(h.dtype)], -1)
            z = self.confidence.logit(conf_in)
        else:
            z = jnp.zeros(rows.shape, jnp.float32)
        return logits.reshape(lead + logits.shape[1:]), z.reshape(lead + (g,))


"""Training-time drafter forward (spec §2.5): many anchor blocks per sequence in one pass.

Context K/V are computed once per sequence from the cached target features and shared by every block
of that sequence; each block sees context strictly before its anchor (its `ctx_len` is the anchor
position) and its own slots bidirectionally — the same `backbone` code path inference uses.
"""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp

from dspark_jax.drafters.dspark import context_cache, lookup_inputs
from dspark_jax.models.kv_cache import KVCache
from dspark_jax.models.kv_cache import init_cache
from dspark_jax.training.anchors import build_blocks, sample_anchors


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """A padded batch of cached sequences: tokens/loss_mask [B, T]; features [B, T, m·d];
    last_hidden [B, T, d] (final-normed target states); target_lse [B, T] (full-vocabulary log-sum-exp);
    lengths [B] real sequence lengths (None: unknown; the DSpark forward does not use them)."""
    tokens: jax.Array
    loss_mask: jax.Array
    features: jax.Array | None
    last_hidden: jax.Array | None
    target_lse: jax.Array | None
    lengths: jax.Array | None = None

    def check(self) -> None:
        """Shape / dtype checks at the training step's jit boundary (chex, evaluated while tracing).
        AssertionError naming the mismatch otherwise."""
        chex.assert_rank(self.tokens, 2)
        chex.assert_type([self.tokens, self.loss_mask], int)
        chex.assert_equal_shape([self.tokens, self.loss_mask])
        b, t = self.tokens.shape
        if self.features is not None:
            chex.assert_rank([self.features, self.last_hidden], 3)
            chex.assert_shape([self.features, self.last_hidden], (b, t, None))
            chex.assert_shape(self.target_lse, (b, t))
        if self.lengths is not None:
            chex.assert_shape(self.lengths, (b,))


def to_batch(np_batch: dict, feature_dtype) -> TrainBatch:
    """Numpy batch from the target cache → device arrays (features None for an online-mode sequence cache)."""
    online = "features" not in np_batch
    opt = lambda name, dt: None if online else jnp.asarray(np_batch[name], dt)  # noqa: E731
    return TrainBatch(tokens=jnp.asarray(np_batch["tokens"], jnp.int32),
                      loss_mask=jnp.asarray(np_batch["loss_mask"], jnp.int32),
                      features=opt("features", feature_dtype), last_hidden=opt("last_hidden", feature_dtype),
                      target_lse=opt("target_lse", jnp.float32),
                      lengths=jnp.asarray(np_batch["lengths"], jnp.int32) if "lengths" in np_batch else None)


def block_outputs(drafter, target_model, batch: TrainBatch, key: jax.Array, num_anchors: int):
    """Runs the drafter over `num_anchors` sampled blocks per sequence.

    Returns (blocks, draft logits [B, K, G, N], confidence logits [B, K, G], hidden [B, K, G, d])."""
    b, t = batch.tokens.shape
    g = drafter.config.block_size
    keys = jax.random.split(key, b)
    anchors, valid = jax.vmap(sample_anchors, in_axes=(0, 0, None))(keys, batch.loss_mask.astype(bool), num_anchors)
    blocks = jax.vmap(build_blocks, in_axes=(0, 0, 0, 0, None, None))(
        batch.tokens, batch.loss_mask.astype(bool), anchors, valid, g, drafter.config.mask_token_id)
    ctx = drafter.write_context(context_cache(drafter.init_state(b, t)), batch.features, jnp.zeros((b,), jnp.int32))
    k = anchors.shape[1]
    rep = lambda a: jnp.repeat(a, k, axis=0)  # noqa: E731  [B, ...] -> [B*K, ...]
    ctx_bk = KVCache(tuple(rep(x) for x in ctx.k), tuple(rep(x) for x in ctx.v))
    anchor_tok = blocks.input_ids[:, :, 0].reshape(b * k)
    start = anchors.reshape(b * k)
    lookup = None
    if drafter.config.lookup_inputs:  # what a lookup over the text up to each anchor proposes
        lookup = lookup_inputs(rep(batch.tokens), start, drafter.config.lookup_inputs, g, drafter.config.mask_token_id)
    hidden = drafter.backbone(target_model, anchor_tok, start, ctx_bk, lookup=lookup)  # [B*K, G, d]
    head = drafter.head_matrix(target_model)
    base = drafter.base_logits(hidden, head)
    logits, conf = drafter.teacher_forced(hidden, base, blocks.prev_tokens.reshape(b * k, g))
    shape = (b, k, g)
    return blocks, logits.reshape(shape + logits.shape[-1:]), conf.reshape(shape), hidden.reshape(shape + (-1,))


def target_block_logits(drafter, target_model, batch: TrainBatch, blocks):
    """Target logits over the draft vocabulary at each block slot's target position, and the matching
    full-vocabulary log-sum-exp. Returns ([B, K, G, N], [B, K, G])."""
    b, k, g = blocks.target_positions.shape
    pos = blocks.target_positions.reshape(b, k * g)
    h = jnp.take_along_axis(batch.last_hidden, pos[..., None], axis=1)  # [B, K*G, d]
    lse = jnp.take_along_axis(batch.target_lse, pos, axis=1)
    head = drafter.head_matrix(target_model)
    logits = jnp.einsum("btd,nd->btn", h.astype(head.dtype), head, preferred_element_type=jnp.float32)
    cap = target_model.config.final_logit_softcapping
    if cap:
        logits = cap * jnp.tanh(logits / cap)
    return logits.reshape(b, k, g, -1), lse.reshape(b, k, g)


def draft_labels(drafter, labels: jax.Array) -> jax.Array:
    """Target-id labels → draft-vocabulary indices, -1 outside the draft vocabulary."""
    idx = jnp.take(drafter.target_to_draft[...], labels, axis=0)
    return jnp.where(idx >= drafter.vocab_size, -1, idx)


def full_logsumexp(target_model, hidden: jax.Array, rows_per_chunk: int = 64) -> jax.Array:
    """log-sum-exp of the target's full-vocabulary logits for hidden [B, T, d], a chunk of rows at a time
    (Gemma's 262k-token logits for a whole batch would not fit)."""
    b, t, d = hidden.shape
    n = b * t
    pad = (-n) % rows_per_chunk
    rows = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, rows_per_chunk, d)
    lse = jax.lax.map(lambda r: jax.nn.logsumexp(target_model.logits(r), axis=-1), rows)
    return lse.reshape(-1)[:n].reshape(b, t)


def with_online_features(target_model, batch: TrainBatch, layer_ids: tuple[int, ...]) -> TrainBatch:
    """Online mode (no target cache): runs the frozen target inside the training step to get the tapped
    features, final-normed hidden states and log-sum-exps the cache would have held."""
    b, t = batch.tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    out = target_model(batch.tokens, pos, init_cache(target_model.config, b, t, target_model.dtype),
                       jnp.zeros((b,), jnp.int32), tap_layers=tuple(layer_ids))
    hidden = out.hidden
    return jax.lax.stop_gradient(dataclasses.replace(
        batch, features=jnp.concatenate(out.taps, axis=-1), last_hidden=hidden,
        target_lse=full_logsumexp(target_model, hidden)))

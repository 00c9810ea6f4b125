"""Eagle3 training-time-test (TTT) forward (spec §2.9), built from `Eagle3Drafter`'s own sub-modules.

For a padded batch of T positions and S = ttt_length steps, every position i of every sequence is a
draft start (the reference's TTT), or only A sampled rows per sequence (`queries`). Step k (0-based) at query i:

    token   x_{i+k+1}                                   (0 past the end of the batch row)
    hidden  fc(features_i) at k = 0, else step k-1's output hidden at i (pre-norm)
    RoPE    position i + k
    keys    chunk 0 (step 0's K/V): j <= i and j < len  (causal over the committed pairs)
            chunks 1..k (steps 1..k's K/V): only the query's own position i (the diagonal)
    logits  softcap(norm(hidden_out) @ head^T) over the draft vocabulary -> log-softmax
    target  the target distribution of token x_{i+k+2} = exp(target logits - full lse) at row i+k+1,
            restricted to the draft vocabulary (not renormalised)
    mask    x_{i+k+2} exists (i+k+2 < len) and is supervised (loss_mask[i+k+2]), and so is the token before
            it (loss_mask[i+k+1]): the target cache stores the log-sum-exp only at loss positions

This is exactly what `Eagle3Drafter.propose` computes when drafting from the anchor at position i+1 with the
context pairs (features_j, x_{j+1}), j < i, in its cache and the tokens x_{i+2}, x_{i+3}, ... fed back: step
0 writes the pair (features_i, x_{i+1}) at position i, step k the pair (step k-1's hidden, x_{i+k+1}) at i+k,
and each step attends to every cache row up to its own position.

Cost and memory: with every row a draft start the outputs are [S, B, T, N] float32 and the S vocabulary
projections run at all B·T rows — 17 s/step on a 2-core CPU at T 512, N 32k, S 7, B 4, five times the
positions DSpark trains on. With `queries` (A sampled draft starts per sequence, our deviation from the
reference's every-row TTT: an unbiased sample of the same per-start loss, at DSpark's anchor budget) they are
[S, B, A, N]; `eagle3_ttt_loss` then weighs every sequence alike (a sequence with fewer than A starts has
invalid slots, which still count in its divisor), where the every-row loss weighs sequences by their number of
starts — harmless for Adam, but the two losses are not on one scale. At Qwen scale (T 4096, N 151,936) even
that needs a per-step (chunked) soft cross-entropy, which is not implemented yet.

Mask convention: the reference's mask is written as `mask_k[i] = loss_mask[i+k]` (last real token zeroed).
Here query i at step k is supervised iff the token it predicts, x_{i+k+2}, is a real, supervised token (the
rule of DSpark's `eval_mask`) AND the target row i+k+1 it is trained toward is a loss position, where the
cache has the target's log-sum-exp (elsewhere it holds 0). This drops only predictions of the first token of
each response, which inference never drafts either (the target produces it; drafting starts after it) —
the same set DSpark trains (its anchors and target rows lie inside the response).
"""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from dspark_jax.drafters.base import softcap
from dspark_jax.models.layers import apply_rope, rope_inv_freq
from dspark_jax.training.anchors import sample_anchors
from dspark_jax.training.forward import TrainBatch, target_block_logits

_NEG = -1e30  # finite: a fully masked row softmaxes to uniform weights (zeroed afterwards), never NaN


def ttt_attention(q: jax.Array, k0: jax.Array, v0: jax.Array, diag_k: jax.Array | None, diag_v: jax.Array | None,
                  lengths: jax.Array, scale: float, query_rows: jax.Array | None = None) -> jax.Array:
    """TTT attention for one step.

    q [B, A, H, D] at query rows `query_rows` [B, A] (None: A = T and query a is row a); k0, v0 [B, T, KVH, D]
    (chunk 0); diag_k, diag_v [B, A, C, KVH, D] (chunks 1..C, only the query's own row is visible) or None at
    step 0; lengths [B]. A query at row i sees chunk-0 keys j <= i, j < len and its C diagonal keys. Softmax in
    float32; rows with nothing visible give zeros. Returns [B, A, H, D].
    """
    b, t, h, d = q.shape
    kvh = k0.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    s0 = jnp.einsum("btkgd,bskd->bkgts", qg, k0, preferred_element_type=jnp.float32) * scale
    j = jnp.arange(k0.shape[1])
    rows = jnp.broadcast_to(jnp.arange(t)[None], (b, t)) if query_rows is None else query_rows
    mask0 = (j[None, None, :] <= rows[:, :, None]) & (j[None, None, :] < lengths[:, None, None])  # [B, A, T]
    mask0 = mask0[:, None, None]                                                                  # [B,1,1,A,T]
    s0 = jnp.where(mask0, s0, _NEG)
    if diag_k is None:
        w = jnp.where(mask0, jax.nn.softmax(s0, axis=-1), 0.0)
        out = jnp.einsum("bkgts,bskd->btkgd", w.astype(v0.dtype), v0, preferred_element_type=jnp.float32)
        return out.reshape(b, t, h, d).astype(q.dtype)
    c = diag_k.shape[2]
    sd = jnp.einsum("btkgd,btckd->bkgtc", qg, diag_k, preferred_element_type=jnp.float32) * scale
    w = jax.nn.softmax(jnp.concatenate([s0, sd], axis=-1), axis=-1)
    n0 = k0.shape[1]
    w0 = jnp.where(mask0, w[..., :n0], 0.0)
    wd = w[..., n0:n0 + c]
    out = (jnp.einsum("bkgts,bskd->btkgd", w0.astype(v0.dtype), v0, preferred_element_type=jnp.float32)
           + jnp.einsum("bkgtc,btckd->btkgd", wd.astype(diag_v.dtype), diag_v, preferred_element_type=jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)


def _at(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x [B, T] read at rows [B, A] (any int >= 0); 0 at rows >= T."""
    t = x.shape[1]
    return jnp.where(rows < t, jnp.take_along_axis(x, jnp.minimum(rows, t - 1), axis=1), 0)


def ttt_query_rows(key: jax.Array, loss_mask: jax.Array, num_queries: int) -> tuple[jax.Array, jax.Array]:
    """Samples `num_queries` TTT draft starts per sequence: query rows i = a - 1 for anchors a drawn by
    `sample_anchors` (a and a + 1 supervised — exactly the rows whose step-0 prediction x_{i+2} has a mask),
    the same draft starts per sequence as DSpark/DFlash training. key: one PRNG key; loss_mask [B, T].
    Returns (rows [B, A] int32, valid [B, A] bool)."""
    keys = jax.random.split(key, loss_mask.shape[0])
    anchors, valid = jax.vmap(sample_anchors, in_axes=(0, 0, None))(keys, loss_mask.astype(bool), num_queries)
    return jnp.maximum(anchors - 1, 0), valid & (anchors >= 1)


def eagle3_ttt_outputs(drafter, target_model, batch: TrainBatch, ttt_length: int,
                       queries: tuple[jax.Array, jax.Array] | None = None):
    """Runs the S = ttt_length TTT steps of an `Eagle3Drafter` over a batch.

    queries: None — every row is a draft start (the reference's TTT), A = T; or (rows [B, A] int32, valid
    [B, A] bool) from `ttt_query_rows` — only those rows are draft starts. Chunk 0 (the committed pairs every
    query attends to) is always computed over all T rows; steps 1..S-1, the output head and the target rows
    only at the A queries, so the cost of the vocabulary projections scales with A, not T. Each query's
    outputs are exactly those it has in the every-row run (tested).
    Returns (step_log_probs [S, B, A, N] float32 draft log-softmax, step_target_probs [S, B, A, N] float32,
    step_masks [S, B, A] bool), N = the drafter's vocabulary — the inputs of `eagle3_ttt_loss`.
    `batch.lengths` [B] (None: every row is T long) bounds the visible context.
    """
    if ttt_length < 1:
        raise ValueError(f"ttt_length must be >= 1, got {ttt_length}")
    b, t = batch.tokens.shape
    s = int(ttt_length)
    lengths = (jnp.full((b,), t, jnp.int32) if batch.lengths is None else jnp.asarray(batch.lengths, jnp.int32))
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    rows, valid = (idx, jnp.ones((b, t), bool)) if queries is None else queries
    a = drafter.self_attn
    inv_freq = rope_inv_freq(a.head_dim, a.rope_theta, a.rope_scaling)
    head = drafter.head_matrix(target_model)
    cap = drafter.target_config.final_logit_softcapping
    gather = lambda x: jnp.take_along_axis(x, rows.reshape(b, -1, *([1] * (x.ndim - 2))), axis=1)  # noqa: E731

    hidden_all = batch.features.astype(drafter.fc[...].dtype) @ drafter.fc[...]
    x_all = drafter._inputs(target_model, hidden_all, _at(batch.tokens, idx + 1))
    k0, v0 = a.project_kv(x_all, idx)  # step 0's K/V: the committed pairs (features_j, x_{j+1}) at every row
    hidden = gather(hidden_all)
    diag_k, diag_v, log_probs = [], [], []
    for k in range(s):
        pos = rows + k
        x_in = gather(x_all) if k == 0 else drafter._inputs(target_model, hidden, _at(batch.tokens, rows + k + 1))
        q = (x_in @ a.q_proj[...]).reshape(b, rows.shape[1], a.num_heads, a.head_dim)
        q = apply_rope(a.q_norm(q), pos, inv_freq)
        if k > 0:
            kk, vv = a.project_kv(x_in, pos)
            diag_k.append(kk)
            diag_v.append(vv)
        dk = jnp.stack(diag_k, axis=2) if diag_k else None
        dv = jnp.stack(diag_v, axis=2) if diag_v else None
        out = ttt_attention(q, k0, v0, dk, dv, lengths, a.scale, rows).reshape(b, rows.shape[1], -1) @ a.o_proj[...]
        x = hidden + out
        hidden = x + drafter.mlp(drafter.post_attention_layernorm(x))
        logits = jnp.einsum("btd,nd->btn", drafter.norm(hidden), head.astype(hidden.dtype),
                            preferred_element_type=jnp.float32)
        log_probs.append(jax.nn.log_softmax(softcap(logits, cap), axis=-1))

    # target distribution of x_{i+k+2}: the target's logits at row i+k+1 (clamped; masked where it is past the end)
    steps = jnp.arange(1, s + 1, dtype=jnp.int32)
    t_rows = jnp.minimum(rows[:, None, :] + steps[None, :, None], t - 1)                       # [B, S, A]
    t_logits, lse = target_block_logits(drafter, target_model, batch, types.SimpleNamespace(target_positions=t_rows))
    target_probs = jnp.exp(t_logits - lse[..., None])                                        # [B, S, A, N]
    masks = jnp.stack([valid & (rows + k + 2 < lengths[:, None]) & (_at(batch.loss_mask, rows + k + 2) != 0)
                       & (_at(batch.loss_mask, rows + k + 1) != 0) for k in range(s)])
    return jnp.stack(log_probs), jnp.swapaxes(target_probs, 0, 1), masks


def ttt_loss_floor(step_target_probs: jax.Array, step_masks: jax.Array) -> jax.Array:
    """[S] the smallest per-step `eagle3_ttt_loss` any draft distribution reaches on these targets:
    −Σ_{masked} Σ_v q log(q / Z) / (B·T), Z = Σ_v q (1 over a full vocabulary; < 1 over a reduced one).
    loss_per_step − floor = Σ_{masked} Z·KL(q/Z ‖ p) / (B·T) ≥ 0: the part of the loss training can remove
    (the soft-CE itself never falls below the target's entropy)."""
    _, b, t, _ = step_target_probs.shape
    q = jax.lax.stop_gradient(step_target_probs.astype(jnp.float32))
    z = jnp.sum(q, axis=-1, keepdims=True)
    ent = -jnp.sum(jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q / z, 1.0)), 0.0), axis=-1)  # [S, B, T]
    return jnp.sum(jnp.where(step_masks, ent, 0.0), axis=(1, 2)) / (b * t)

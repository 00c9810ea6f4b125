"""Independent float64 NumPy reference of the drafters' forward computations.

Written from the re-implementation spec (docs/dspark-reference-spec.md §1.3–1.7, §1.10, §3.3–3.4), not from
our JAX code: nothing here imports `dspark_jax`. It reads plain nested dicts of parameter arrays (pulled out of
an nnx module by `params_of`) and recomputes everything from scratch for ONE request, without any cache:

- `dspark_hidden`: the DSpark/DFlash block forward [anchor, MASK × (G-1)] at positions a..a+G-1 over the
  context features of positions 0..a-1 (strictly before the anchor), non-causal, K/V injection per layer.
- `sequential_logits` / `greedy_block`: Markov-corrected logits (vanilla / gated / rnn) and confidence logits,
  teacher-forced or greedy left to right, full or reduced draft vocabulary.
- `eagle3_block`: Eagle3's sequential proposal, recomputing the single layer over all (hidden, token) pairs
  at every step.

Parameter layout (what `params_of` returns): nested dicts keyed like the module attributes; matrices are
[in, out] (x @ W). Concatenation orders are the spec's: gated head input [h; W1[prev]], rnn input
[s; W1[prev]; h] split into (gate, cand, out), confidence input [h; W1[prev]], Eagle3 q/k/v input
[input_layernorm(embed); hidden_norm(hidden)].
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


# ---- parameters ------------------------------------------------------------------------------------

def params_of(module) -> dict:
    """All nnx variables of `module` as a nested dict of NumPy arrays (floats as float64)."""
    from flax import nnx  # only for pulling arrays out; no computation happens in JAX

    def conv(x):
        a = np.asarray(x)
        return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return conv(node)

    return walk(nnx.to_pure_dict(nnx.state(module)))


@dataclasses.dataclass(frozen=True)
class Dims:
    """What the draft layers take from the target config (spec §1.2, §1.8)."""
    gemma: bool
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    rope_scaling: float
    attn_scale: float
    embed_scale: float
    softcap: float | None

    @staticmethod
    def from_target(cfg) -> "Dims":
        # draft layers are all full attention with the target's full-attention RoPE (base and linear scaling)
        full = [th for th, t in zip(cfg.rope_thetas, cfg.layer_types) if t == "full_attention"]
        if not full:
            raise ValueError("target has no full-attention layer")
        gemma = cfg.family == "gemma3"
        return Dims(gemma=gemma, hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                    head_dim=cfg.head_dim, eps=cfg.rms_norm_eps, rope_theta=float(full[0]),
                    rope_scaling=float(cfg.rope_scaling_factor),
                    attn_scale=float(cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5,
                    embed_scale=math.sqrt(cfg.hidden_size) if gemma else 1.0,
                    softcap=cfg.final_logit_softcapping)


def target_embedding(target_params: dict) -> np.ndarray:
    """[V, d] input embedding table (unscaled)."""
    return target_params["embed_tokens"]


def target_head_rows(target_params: dict, draft_ids: Sequence[int] | None = None) -> np.ndarray:
    """[N, d] output-embedding rows (tied: the input embedding) of the draft vocabulary (all rows if None)."""
    head = target_params["lm_head"].T if target_params.get("lm_head") is not None else target_params["embed_tokens"]
    return head if draft_ids is None else head[np.asarray(draft_ids)]


def markov_row(token: int, draft_ids: Sequence[int] | None) -> int:
    """Markov-embedding row of a previous target token: its draft index, or the extra last row N if the
    token lies outside a reduced draft vocabulary."""
    if draft_ids is None:
        return int(token)
    ids = [int(i) for i in draft_ids]
    return ids.index(int(token)) if int(token) in ids else len(ids)


# ---- primitives ------------------------------------------------------------------------------------

def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float, gemma: bool) -> np.ndarray:
    """x / rms(x) · scale; Gemma stores w with scale 1 + w, Qwen scale w; w None = no learnable scale."""
    x = np.asarray(x, np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    if w is None:
        return y
    return y * ((1.0 + w) if gemma else w)


def rope(x: np.ndarray, positions: np.ndarray, theta: float, scaling: float) -> np.ndarray:
    """HF "rotate_half" RoPE on x [T, heads, D]: dims i and i + D/2 form one rotating pair with frequency
    theta^(-2i/D); linear scaling divides the position."""
    d = x.shape[-1]
    half = d // 2
    freq = theta ** (-2.0 * np.arange(half, dtype=np.float64) / d)
    ang = (np.asarray(positions, np.float64) / scaling)[:, None] * freq[None, :]  # [T, D/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x * sigmoid(x)


def softcap(logits: np.ndarray, cap: float | None) -> np.ndarray:
    return cap * np.tanh(logits / cap) if cap else logits


def gqa_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                  allowed: np.ndarray | None = None) -> np.ndarray:
    """q [Tq, H, D]; k, v [Tk, KVH, D]; query head h uses KV head h // (H / KVH). allowed [Tq, Tk] bool
    (None = every key). Returns [Tq, H, D]."""
    tq, nh, d = q.shape
    rep = nh // k.shape[1]
    out = np.zeros((tq, nh, v.shape[-1]))
    for h in range(nh):
        s = (q[:, h, :] @ k[:, h // rep, :].T) * scale
        if allowed is not None:
            s = np.where(allowed, s, -np.inf)
        out[:, h, :] = softmax(s, axis=-1) @ v[:, h // rep, :]
    return out


def mlp(p: dict, x: np.ndarray, gemma: bool) -> np.ndarray:
    """down(act(gate x) · up x): GeGLU (tanh GELU) for Gemma, SwiGLU for Qwen."""
    g = x @ p["gate_proj"]
    act = gelu_tanh(g) if gemma else silu(g)
    return (act * (x @ p["up_proj"])) @ p["down_proj"]


def _heads(x: np.ndarray, n: int, d: int) -> np.ndarray:
    return x.reshape(x.shape[0], n, d)


# ---- DSpark / DFlash backbone (spec §1.3, §1.4, §1.5, §1.8, §3.3) ------------------------------------

def dspark_hidden(p: dict, dims: Dims, target_params: dict, features: np.ndarray, anchor: int,
                  mask_token_id: int, block_size: int) -> np.ndarray:
    """Final-normed hidden states H [G, d] of one block.

    features: [a, m·d] target features of positions 0..a-1 (the anchor sits at position a; its own feature
    is NOT context). Block = [anchor, MASK × (G-1)] at positions a..a+G-1.
    """
    features = np.asarray(features, np.float64)
    a, g = features.shape[0], block_size
    c = rms_norm(features @ p["fc"], p["hidden_norm"]["weight"], dims.eps, dims.gemma)  # [a, d], once
    tokens = np.array([anchor] + [mask_token_id] * (g - 1))
    x = target_embedding(target_params)[tokens] * dims.embed_scale
    ctx_pos = np.arange(a)
    blk_pos = a + np.arange(g)
    key_pos = np.concatenate([ctx_pos, blk_pos])
    nh, nkv, hd = dims.heads, dims.kv_heads, dims.head_dim
    layers = p["layers"]
    for i in sorted(layers):
        lp = layers[i]
        at = lp["self_attn"]
        h = rms_norm(x, lp["input_layernorm"]["weight"], dims.eps, dims.gemma)
        q = rms_norm(_heads(h @ at["q_proj"], nh, hd), at["q_norm"]["weight"], dims.eps, dims.gemma)
        q = rope(q, blk_pos, dims.rope_theta, dims.rope_scaling)
        k_in = np.concatenate([c @ at["k_proj"], h @ at["k_proj"]], axis=0)  # context first, then block
        v = _heads(np.concatenate([c @ at["v_proj"], h @ at["v_proj"]], axis=0), nkv, hd)
        k = rms_norm(_heads(k_in, nkv, hd), at["k_norm"]["weight"], dims.eps, dims.gemma)
        k = rope(k, key_pos, dims.rope_theta, dims.rope_scaling)
        o = gqa_attention(q, k, v, dims.attn_scale).reshape(g, nh * hd) @ at["o_proj"]  # non-causal
        if dims.gemma:  # sandwich norms
            x = x + rms_norm(o, lp["post_attention_layernorm"]["weight"], dims.eps, True)
            f = mlp(lp["mlp"], rms_norm(x, lp["pre_feedforward_layernorm"]["weight"], dims.eps, True), True)
            x = x + rms_norm(f, lp["post_feedforward_layernorm"]["weight"], dims.eps, True)
        else:
            x = x + o
            x = x + mlp(lp["mlp"], rms_norm(x, lp["post_attention_layernorm"]["weight"], dims.eps, False), False)
    return rms_norm(x, p["norm"]["weight"], dims.eps, dims.gemma)


def base_logits(hidden: np.ndarray, head_rows: np.ndarray, cap: float | None) -> np.ndarray:
    """U = softcap(H @ head^T) over the draft vocabulary rows."""
    return softcap(np.asarray(hidden, np.float64) @ head_rows.T, cap)


# ---- sequential (Markov) head and confidence head (spec §1.6, §1.7) -----------------------------------

def markov_step(mp: dict, kind: str, prev_row: int, h: np.ndarray, state: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """(bias [N], next state [r]) for one slot."""
    e = mp["w1"][prev_row]
    r = e.shape[0]
    if kind == "vanilla":
        z = e
    elif kind == "gated":
        gate = sigmoid(np.concatenate([h, e]) @ mp["gate_w"] + mp["gate_b"])
        z = gate * e
    elif kind == "rnn":
        j = np.concatenate([state, e, h]) @ mp["joint_w"] + mp["joint_b"]
        g, cand, out = j[:r], j[r:2 * r], j[2 * r:]
        state = sigmoid(g) * state + (1.0 - sigmoid(g)) * np.tanh(cand)
        z = np.tanh(out)  # from the OLD state via j
    else:
        raise ValueError(kind)
    return z @ mp["w2"], state


def confidence_logit(p: dict, h: np.ndarray, prev_row: int | None) -> float:
    """w · [h; W1[prev]] + b (or w · h + b without the Markov input)."""
    cp = p["confidence"]
    feat = h if prev_row is None else np.concatenate([h, p["markov"]["w1"][prev_row]])
    return float(feat @ cp["w"] + cp["b"])


def sequential_logits(p: dict, kind: str | None, base: np.ndarray, hidden: np.ndarray, prev_rows: Sequence[int],
                      confidence: bool, conf_with_markov: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced: prev_rows[k] = Markov row of x_{k-1} (prev_rows[0] = the anchor's row).

    Returns (corrected logits [G, N], confidence logits [G] — zeros without a confidence head).
    kind None = no Markov head (DFlash).
    """
    g = base.shape[0]
    out = np.array(base, np.float64)
    conf = np.zeros(g)
    state = np.zeros(p["markov"]["w1"].shape[1]) if kind is not None else None
    for k in range(g):
        if kind is not None:
            bias, state = markov_step(p["markov"], kind, prev_rows[k], hidden[k], state)
            out[k] = out[k] + bias
        if confidence:
            conf[k] = confidence_logit(p, hidden[k], prev_rows[k] if (conf_with_markov and kind is not None) else None)
    return out, conf


def greedy_block(p: dict, kind: str | None, base: np.ndarray, hidden: np.ndarray, anchor: int,
                 draft_ids: Sequence[int] | None, confidence: bool, conf_with_markov: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy left-to-right sampling (argmax at T=0). Returns (draft indices [G], corrected logits [G, N],
    confidence logits [G]). Sampled draft indices are their own Markov rows."""
    g = base.shape[0]
    prev = [markov_row(anchor, draft_ids)]
    idx = []
    for k in range(g):
        logits, _ = sequential_logits(p, kind, base[:k + 1], hidden[:k + 1], prev, confidence, conf_with_markov)
        idx.append(int(np.argmax(logits[k])))
        prev.append(idx[-1])
    logits, conf = sequential_logits(p, kind, base, hidden, prev[:g], confidence, conf_with_markov)
    return np.array(idx), logits, conf


# ---- Eagle3 (spec §1.10, §3.4) --------------------------------------------------------------------------

def eagle3_block(p: dict, dims: Dims, target_params: dict, features: np.ndarray, next_tokens: Sequence[int],
                 steps: int, draft_ids: Sequence[int] | None = None,
                 forced: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eagle3 proposal for one request whose anchor (newest committed token) sits at position n.

    features: [n, m·d] target features of positions 0..n-1; next_tokens: [n] tokens at positions 1..n
    (the last is the anchor). Pair i = (fc(features_i), next_tokens_i) at RoPE position i. Each step runs the
    single layer causally over ALL pairs (no cache), reads the last output hidden, takes logits =
    softcap(norm(hidden) @ head^T), picks argmax (or forced[k], a draft index), and appends the pair
    (that output hidden, the chosen token) at the next position.

    Returns (draft indices [steps], logits [steps, N]).
    """
    features = np.asarray(features, np.float64)
    hiddens = list(features @ p["fc"])  # no norm after fc
    toks = [int(t) for t in next_tokens]
    head = target_head_rows(target_params, draft_ids)
    emb = target_embedding(target_params)
    nh, nkv, hd = dims.heads, dims.kv_heads, dims.head_dim
    at = p["self_attn"]
    out_idx, out_logits = [], []
    for k in range(steps):
        t = len(toks)
        hid = np.stack(hiddens)
        e = emb[np.array(toks)] * dims.embed_scale
        xin = np.concatenate([rms_norm(e, p["input_layernorm"]["weight"], dims.eps, dims.gemma),
                              rms_norm(hid, p["hidden_norm"]["weight"], dims.eps, dims.gemma)], axis=-1)
        pos = np.arange(t)
        q = rope(rms_norm(_heads(xin @ at["q_proj"], nh, hd), at["q_norm"]["weight"], dims.eps, dims.gemma),
                 pos, dims.rope_theta, dims.rope_scaling)
        kk = rope(rms_norm(_heads(xin @ at["k_proj"], nkv, hd), at["k_norm"]["weight"], dims.eps, dims.gemma),
                  pos, dims.rope_theta, dims.rope_scaling)
        v = _heads(xin @ at["v_proj"], nkv, hd)
        causal = pos[None, :] <= pos[:, None]
        o = gqa_attention(q, kk, v, dims.attn_scale, causal).reshape(t, nh * hd) @ at["o_proj"]
        x = hid + o  # residual stream = un-normed hidden
        x = x + mlp(p["mlp"], rms_norm(x, p["post_attention_layernorm"]["weight"], dims.eps, dims.gemma), dims.gemma)
        last = x[-1]
        logits = softcap(rms_norm(last, p["norm"]["weight"], dims.eps, dims.gemma) @ head.T, dims.softcap)
        i = int(np.argmax(logits)) if forced is None else int(forced[k])
        out_idx.append(i)
        out_logits.append(logits)
        hiddens.append(last)
        toks.append(int(draft_ids[i]) if draft_ids is not None else i)
    return np.array(out_idx), np.stack(out_logits)

"""DSpark's sequential heads (vanilla / gated Markov, RNN) and the confidence head (spec §1.6–1.7)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.drafters.base import nearest_set
from dspark_jax.models.layers import param


class MarkovHead(nnx.Module):
    """Adds a bias from the previous token to the base logits: logits_k = U_k + W2(f(W1[x_{k-1}], h_k, s)).

    vanilla: W2 W1[prev]; gated: W2(σ(Wg[h; W1[prev]] + bg) ⊙ W1[prev]);
    rnn: state s_k = σ(g)⊙s_{k-1} + (1-σ(g))⊙tanh(c), bias = W2 tanh(o) with [g, c, o] = J[s_{k-1}; W1[prev]; h] + b.
    `num_rows` = draft vocab (+1 row for previous tokens outside a reduced draft vocabulary).
    """

    def __init__(self, kind: str, num_rows: int, vocab: int, rank: int, hidden: int, dtype, rngs: nnx.Rngs):
        self.kind, self.rank = kind, rank
        self.w1 = param(rngs, (num_rows, rank), ("draft_vocab", "markov"), dtype)
        self.w2 = param(rngs, (rank, vocab), ("markov", "draft_vocab"), dtype)
        if kind == "gated":
            self.gate_w = param(rngs, (hidden + rank, rank), ("embed", "markov"), dtype)
            self.gate_b = nnx.Param(jnp.zeros((rank,), dtype), sharding_names=("markov",), eager_sharding=False)
        elif kind == "rnn":
            self.joint_w = param(rngs, (2 * rank + hidden, 3 * rank), ("embed", "markov"), dtype)
            self.joint_b = nnx.Param(jnp.zeros((3 * rank,), dtype), sharding_names=("markov",), eager_sharding=False)

    def embed_prev(self, prev: jax.Array) -> jax.Array:
        return jnp.take(self.w1[...], prev, axis=0)

    def initial_state(self, batch: int) -> jax.Array:
        return jnp.zeros((batch, self.rank), jnp.float32)

    def step(self, prev: jax.Array, h: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """prev [B] row ids, h [B, d], state [B, r] -> (bias [B, N] float32, next state)."""
        e = self.embed_prev(prev)
        if self.kind == "vanilla":
            z = e
        elif self.kind == "gated":
            g = jax.nn.sigmoid(jnp.concatenate([h, e], -1) @ self.gate_w[...] + self.gate_b[...])
            z = g * e
        else:
            joint = jnp.concatenate([state.astype(e.dtype), e, h], -1) @ self.joint_w[...] + self.joint_b[...]
            gate, cand, out = jnp.split(joint.astype(jnp.float32), 3, axis=-1)
            state = jax.nn.sigmoid(gate) * state + (1 - jax.nn.sigmoid(gate)) * jnp.tanh(cand)
            z = jnp.tanh(out).astype(e.dtype)
        return (z @ self.w2[...]).astype(jnp.float32), state


class ConfidenceHead(nnx.Module):
    """c_k = σ(z_k / T_k + β_k), z_k = w·[h_k; W1[x_{k-1}]] + b: predicted P(slot k accepted | earlier slots
    accepted).

    T_k are Sequential-Temperature-Scaling temperatures (spec §calibration; 1 until calibrated); β_k per-position
    biases (0 unless `dspark calibrate --bias` fitted them: a deviation from the paper's STS, for positions whose
    survival a temperature alone cannot match). Acceptance depends on the sampling temperature, so a head may hold
    one calibration set per sampling temperature: `temperatures` / `biases` [G] (one set, used at every sampling
    temperature) or [S, G] with `calibrated_at` [S] (ascending) the sampling temperature each set was fitted at;
    each request then uses the set fitted nearest to its own temperature (`nearest_set`)."""

    def __init__(self, in_dim: int, block_size: int, dtype, rngs: nnx.Rngs):
        self.w = param(rngs, (in_dim,), ("embed",), dtype)
        self.b = nnx.Param(jnp.zeros((), dtype), sharding_names=(), eager_sharding=False)
        self.temperatures = nnx.Variable(jnp.ones((block_size,), jnp.float32))
        self.biases = nnx.Variable(jnp.zeros((block_size,), jnp.float32))
        self.calibrated_at = nnx.Variable(jnp.zeros((1,), jnp.float32))

    def logit(self, features: jax.Array) -> jax.Array:
        return (features @ self.w[...] + self.b[...]).astype(jnp.float32)

    def calibrated(self, logits: jax.Array, sampling_temperature: jax.Array | None = None) -> jax.Array:
        """σ(z_k / T_k + β_k) for logits [..., G]; with several calibration sets, logits [B, G] and each row's
        `sampling_temperature` [B] picks its set (ValueError when it is missing)."""
        g = logits.shape[-1]  # a drafter may run with fewer slots than it was trained with
        temps, biases = self.temperatures[...], self.biases[...]
        if temps.ndim == 2:
            if sampling_temperature is None:
                raise ValueError("this confidence head holds one calibration set per sampling temperature: "
                                 "pass each request's sampling temperature")
            row = nearest_set(self.calibrated_at[...], sampling_temperature)
            temps, biases = temps[row], biases[row]
        return jax.nn.sigmoid(logits / temps[..., :g] + biases[..., :g])


"""`token_probs` read lazily: per-row statistics instead of the [T, V] probabilities (verification rounds)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dspark_jax.sampling.exact_compare import argmax_and_finite, fast_argmax
from dspark_jax.sampling.params import NEG_INF, FilterMode, SamplingParams, scale_logits
from dspark_jax.sampling.threshold import apply_threshold, filter_threshold


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LazyTokenProbs:
    """`token_probs(logits, params, mode)` [T, V] read lazily: per row only the filter threshold, the max and
    the softmax normaliser 1 / Σ exp(z − max) of the filtered logits z, the argmax (greedy rows) and whether the
    row is finite are kept.

    Indexing mirrors the dense array: `p[rows, tokens]` gathers p(token) = exp(z_token − max) / Σ (greedy rows:
    1 iff token is the argmax), `p[rows]` builds those full rows [..., V]. Both use the operations of
    `token_probs` on the same per-row quantities, so they equal the dense values (up to the 1-ulp differences
    between the exp kernels XLA:CPU picks for different fusions, which the dense path has across programs too)."""
    logits: jax.Array       # [T, V] raw logits
    temperature: jax.Array  # [T]
    threshold: jax.Array    # [T] keep scaled logits >= threshold (−inf: no filter)
    row_max: jax.Array      # [T] max of the filtered scaled logits
    row_inv_sum: jax.Array  # [T] 1 / Σ exp(z − row_max)
    argmax: jax.Array       # [T] argmax of the raw logits (0 where no row is greedy)
    finite: jax.Array       # [T] bool: every raw logit of the row is finite

    @property
    def shape(self) -> tuple[int, int]:
        return self.logits.shape

    @property
    def greedy(self) -> jax.Array:
        return self.temperature == 0

    def _filtered(self, rows: jax.Array, x: jax.Array) -> jax.Array:
        """Scaled, thresholded logits of `rows` (x: the raw logits there, rows' shape + optional trailing V)."""
        z = scale_logits(x, self.temperature[rows])
        return jnp.where(z >= self.threshold[rows][(...,) + (None,) * (x.ndim - rows.ndim)], z, NEG_INF)

    def at(self, rows: jax.Array, tokens: jax.Array) -> jax.Array:
        """p[rows, tokens] (same shapes)."""
        z = self._filtered(rows, self.logits[rows, tokens])
        p = jnp.exp(z - self.row_max[rows]) * self.row_inv_sum[rows]
        return jnp.where(self.greedy[rows], (tokens == self.argmax[rows]).astype(jnp.float32), p)

    def rows(self, rows: jax.Array) -> jax.Array:
        """p[rows] [..., V]."""
        z = self._filtered(rows, self.logits[rows])
        p = jnp.exp(z - self.row_max[rows][..., None]) * self.row_inv_sum[rows][..., None]
        greedy = jax.nn.one_hot(self.argmax[rows], self.shape[-1], dtype=jnp.float32)
        return jnp.where(self.greedy[rows][..., None], greedy, p)

    def __getitem__(self, index):
        if isinstance(index, tuple):
            rows, tokens = index
            return self.at(*jnp.broadcast_arrays(jnp.asarray(rows), jnp.asarray(tokens)))
        return self.rows(jnp.asarray(index))


@functools.partial(jax.jit, static_argnames='mode')
def lazy_token_probs(logits: jax.Array, params: SamplingParams, mode: FilterMode) -> LazyTokenProbs:
    """LazyTokenProbs of logits [T, V] under per-row params [T]: reductions over the rows only (no [T, V]
    probabilities). The argmax is computed only if some row is greedy, the filter and normaliser only if some
    row is not (lax.cond at run time)."""
    t = logits.shape[0]
    greedy = params.temperature == 0

    def mixed(logits):  # the argmax only if some row is greedy; the finite check apart
        argmax = jax.lax.cond(jnp.any(greedy), fast_argmax, lambda _: jnp.zeros((t,), jnp.int32), logits)
        return argmax, jnp.all(jnp.isfinite(logits), axis=-1)

    # greedy rows only: the finite check from the argmax's pass (`argmax_and_finite`)
    argmax, finite = jax.lax.cond(jnp.all(greedy), argmax_and_finite, mixed, logits)

    def stats(logits):
        thr = filter_threshold(logits, params, mode)
        # the max of the filtered row is the scaled max logit (x · (1/T) is non-decreasing, the max is kept):
        # taken from the raw logits so that the scaled row is not materialised for two reductions
        m = scale_logits(jnp.max(logits, axis=-1), params.temperature)
        z = apply_threshold(scale_logits(logits, params.temperature), thr)
        inv_sum = 1.0 / jnp.sum(jnp.exp(z - m[:, None]), axis=-1)
        thr = jnp.full((t,), NEG_INF, jnp.float32) if thr is None else thr
        return thr, m, inv_sum

    def greedy_only(logits):
        return jnp.full((t,), NEG_INF, jnp.float32), jnp.zeros((t,), jnp.float32), jnp.ones((t,), jnp.float32)

    thr, m, inv_sum = jax.lax.cond(jnp.all(greedy), greedy_only, stats, logits)
    return LazyTokenProbs(logits=logits, temperature=params.temperature, threshold=thr, row_max=m,
                          row_inv_sum=inv_sum, argmax=argmax, finite=finite)

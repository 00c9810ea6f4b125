"""Per-request sampling: temperature, top-k, top-p, greedy at temperature 0.

`filter_logits` is the one transform applied to every distribution that is sampled from or compared
(target and draft alike), so acceptance ratios are computed on exactly the sampled distributions.
Filtering is a per-row threshold on the scaled logits (`filter_threshold`, no sort): keep x >= threshold.
The verification round reads the target distribution through `LazyTokenProbs`: the values of `token_probs`
(same formula on the same per-row threshold / max / normaliser) at the drafted tokens and for the one full
row per request that rejection sampling needs, without materialising [T, V].
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.decoding.keys import row_keys

_NEG_INF = -jnp.inf


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


# ---- filter thresholds without a full sort --------------------------------------------------------------
#
# XLA:CPU runs a row reduction fast only when its fused input is plain arithmetic: a compare or select in it
# makes XLA materialise a [B, V] intermediate first. The full-row passes below therefore compare through
# `_gt_step`, which is exact under the stated conditions.

_CANDIDATES = 1024  # top-p: the nucleus is looked for among this many top candidates before a full search
_TINY = 2.0 ** -100


def _gt_step(a: jax.Array, b: jax.Array) -> jax.Array:
    """[a > b] as float32 0/1 from arithmetic only (max, ceil, min of a − b), for non-NaN a, b (±inf allowed, not
    both the same infinity) where one operand r of every pair has r == 0 or |r| >= 2^-100.

    Exact: a − b rounds to a value of the right sign, and is nonzero when a != b, unless the difference of
    two distinct values is flushed to zero (XLA:CPU flushes denormals), which needs |a|, |b| < 2^-100 both: if
    |r| >= 2^-100 and the other operand is < 2^-101 in magnitude, |a − b| >= 2^-101; otherwise both are
    >= 2^-101 in magnitude and a nonzero difference is a multiple of 2^-124. If r == 0 the difference is ±the
    other operand. (Denormal inputs read as zero in every float operation and comparison alike.)"""
    return jnp.minimum(jnp.ceil(jnp.maximum(a - b, 0.0)), 1.0)


def _gt_safe(r: jax.Array) -> jax.Array:
    """r may serve as the reference operand of `_gt_step`."""
    return (r == 0) | (jnp.abs(r) >= _TINY)


@jax.jit  # eager callers: lax.cond outside jit would re-trace every call
def fast_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, -1) (the first index of the maximum) for x [B, V], int32, without XLA:CPU's slow variadic
    (value, index) reduction: min over (index + V · [x < max]). −inf entries are fine; a batch with NaN, a row
    maximum of ±inf, or one with 0 < |max| < 2^-100 (see `_gt_step`) takes jnp.argmax itself."""
    v = x.shape[-1]
    if v >= 2 ** 23:  # float32 indices must stay exact
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    x = x.astype(jnp.float32)
    m = jnp.max(x, axis=-1, keepdims=True)  # XLA:CPU's max may skip NaN: NaN is caught by the exp sum below

    def fast(x):
        iota = jax.lax.broadcasted_iota(jnp.float32, x.shape, 1)
        return jnp.min(iota + _gt_step(m, x) * v, axis=-1).astype(jnp.int32)

    ok = jnp.isfinite(jnp.sum(jnp.exp(x - m), axis=-1)) & _gt_safe(m[:, 0])  # not finite: NaN, or m = ±inf
    return jax.lax.cond(jnp.all(ok), fast, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), x)


@jax.jit  # eager callers: lax.cond outside jit would re-trace every call
def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """A Gumbel-max draw per row of logits [B, V] (argmax of gumbel noise + logits, with `fast_argmax`), int32.
    key: one key per row [B] (row b's draw depends only on keys[b]: `decoding.keys`), or one key (split
    into B)."""
    keys = row_keys(key, logits.shape[0])
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], logits.dtype))(keys)
    return fast_argmax(noise + logits)


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32, strictly monotone in the float order for non-NaN values (−0 just below +0)."""
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where((u >> 31) == 1, ~u, u | jnp.uint32(0x80000000))


def _from_order_key(k: jax.Array) -> jax.Array:
    u = jnp.where((k >> 31) == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
    return jax.lax.bitcast_convert_type(u, jnp.float32)


def _nucleus_search(x: jax.Array, m: jax.Array, target: jax.Array, hi: jax.Array, search: jax.Array) -> jax.Array:
    """Full-row nucleus threshold for rows without top-k: the smallest value s of the row x [B, V] (finite or
    +inf) with Σ_{x > s} exp(x − m) < target, given hi: a row value satisfying it. Rows with search False
    return hi.

    Bisection over the uint32 order keys of (−inf, hi] with the invariant P(lo) false, P(hi) true, one pass
    over the row per step (about 32 steps). Any probe strictly inside (lo, hi) keeps the invariant, so a probe
    t with 0 < |t| < 2^-100 (where `_gt_step` is not exact) is moved to 0 or ±2^-100 when one of those lies
    inside; only a bracket entirely within the tiny range (row values there) takes an exact compare pass."""
    e = jnp.exp(x - m[:, None])
    k_zero, k_neg, k_pos = (_order_key(jnp.float32(v)) for v in (0.0, -_TINY, _TINY))
    lo = jnp.where(search, _order_key(jnp.full_like(hi, _NEG_INF)), _order_key(hi) - 1)
    hi = _order_key(hi)

    def body(c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        inside = lambda k: (k > lo) & (k < hi)  # noqa: E731
        tiny = (mid > k_neg) & (mid < k_pos) & ~_gt_safe(_from_order_key(mid))
        alt = jnp.where(inside(k_zero), k_zero, jnp.where(inside(k_neg), k_neg, jnp.where(inside(k_pos), k_pos, mid)))
        exact = tiny & (alt == mid)  # no safe probe inside the bracket
        mid = jnp.where(tiny, alt, mid)
        t = _from_order_key(mid)[:, None]
        mass = jax.lax.cond(jnp.any(exact), lambda: jnp.where(x > t, e, 0.0).sum(-1),
                            lambda: jnp.sum(e * _gt_step(x, t), axis=-1))
        ok = mass < target
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo, hi = jax.lax.while_loop(lambda c: jnp.any(c[1] - c[0] > 1), body, (lo, hi))
    return _from_order_key(hi)


@functools.partial(jax.jit, static_argnames='mode')
def filter_threshold(logits: jax.Array, params: SamplingParams, mode: FilterMode) -> jax.Array | None:
    """Per-row threshold on the scaled logits x = `scale_logits(logits)` ([B, V]): the filtered row keeps
    x >= threshold (−inf: everything); None when `mode` filters nothing. `mode` must cover params (as
    `FilterMode.for_params` does: max_top_k >= every top_k).

    top-k: the k-th largest value (all its ties kept). top-p, within the top-k-kept values: walking them in
    descending order, a value is reached while the mass (softmax over the kept values) strictly above it is
    < top_p, and every tie of a reached value is kept — the threshold is the smallest value s with
    mass(x > s) < top_p · mass(kept). (Exactly the old sort + cumsum definition, ties included, up to float
    rounding of the masses.) No sort: the values above s and the kept top-k values are found among the
    `lax.top_k` candidates (top-k rows always; other rows when the nucleus ends above the last candidate);
    other rows bisect over the full row (`_nucleus_search`). top_p >= 1 keeps the whole top-k set."""
    if not (mode.max_top_k or mode.top_p):
        return None
    logits = jax.lax.stop_gradient(logits)  # piecewise constant; and the search loop is not reverse-differentiable
    k, top_p = params.top_k, params.top_p
    v = logits.shape[-1]
    cand_only = bool(mode.all_top_k and mode.max_top_k)  # every row has top-k: its candidates hold everything
    n_cand = min(max(mode.max_top_k, _CANDIDATES) if mode.top_p and not cand_only else mode.max_top_k, v)
    # scaling is non-decreasing: the top values of the scaled row are the scaled top logits
    cand = scale_logits(jax.lax.top_k(logits, n_cand)[0], params.temperature)  # [B, C] descending
    kth = jnp.take_along_axis(cand, jnp.clip(k - 1, 0, n_cand - 1)[:, None], axis=-1)[:, 0]
    kth = jnp.where(k > 0, kth, _NEG_INF)
    if not mode.top_p:
        return kth
    m = cand[:, 0]
    last = cand[:, -1]
    e = jnp.where(cand >= kth[:, None], jnp.exp(cand - m[:, None]), 0.0)
    nucleus = top_p < 1.0

    # mass of the kept values: top-k rows from the candidates plus ties of kth past them (only possible when
    # the last candidate equals kth); rows without top-k over the full row
    def tie_count(logits):
        x = scale_logits(logits, params.temperature)
        return (x >= kth[:, None]).sum(-1) - (cand >= kth[:, None]).sum(-1)

    ties_past = (k > 0) & nucleus & (last == kth)
    extra = jax.lax.cond(jnp.any(ties_past), tie_count, lambda _: jnp.zeros(k.shape, jnp.int32), logits)
    total = e.sum(-1) + jnp.where(ties_past, extra, 0).astype(jnp.float32) * jnp.exp(kth - m)
    no_k = (k <= 0) & nucleus
    if not cand_only:
        full_mass = jax.lax.cond(
            jnp.any(no_k), lambda l: jnp.sum(jnp.exp(scale_logits(l, params.temperature) - m[:, None]), -1),
            lambda _: jnp.ones(k.shape, jnp.float32), logits)
        total = jnp.where(k > 0, total, full_mass)
    target = top_p * total
    before = jnp.cumsum(e, axis=-1) - e  # candidate mass strictly before each (ties: the first one's is exact)
    in_nucleus = (before < target[:, None]) & (cand >= kth[:, None])
    pth = jnp.min(jnp.where(in_nucleus, cand, jnp.inf), axis=-1)
    # a row without top-k whose nucleus reaches the last candidate may go on below it: search the full row
    search = no_k & jnp.any(in_nucleus & (cand == last[:, None]), axis=-1) if n_cand < v else jnp.zeros_like(no_k)
    pth = jax.lax.cond(
        jnp.any(search),
        lambda l: jnp.where(search, _nucleus_search(scale_logits(l, params.temperature), m, target, last, search),
                            pth),
        lambda _: pth, logits)
    return jnp.where(nucleus, jnp.maximum(kth, pth), kth)


def _apply_threshold(x: jax.Array, threshold: jax.Array | None) -> jax.Array:
    if threshold is None:
        return x
    return jnp.where(x >= threshold[(...,) + (None,) * (x.ndim - threshold.ndim)], x, _NEG_INF)


@functools.partial(jax.jit, static_argnames='mode')
def filter_logits(logits: jax.Array, params: SamplingParams, mode: FilterMode) -> jax.Array:
    """Float32 logits / temperature (`scale_logits`) with tokens outside top-k / top-p set to -inf. logits: [B, V]."""
    return _apply_threshold(scale_logits(logits, params.temperature), filter_threshold(logits, params, mode))


def _softmax_stats(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row max and 1 / Σ exp(z − max) of filtered logits z [B, V]: softmax(z) = exp(z − max) · inv_sum.
    (An explicit reciprocal, not a division: XLA:CPU turns a division by a broadcast row value into this
    multiplication but divides same-shaped operands, so the lazy gathers could differ in the last bit.)"""
    m = jnp.max(z, axis=-1, initial=-jnp.inf)
    return m, 1.0 / jnp.sum(jnp.exp(z - m[:, None]), axis=-1)


@functools.partial(jax.jit, static_argnames='mode')
def token_probs(logits: jax.Array, params: SamplingParams, mode: FilterMode) -> jax.Array:
    """The distribution a token is drawn from: softmax of the filtered logits, one-hot argmax if greedy."""
    z = filter_logits(logits, params, mode)
    m, inv_sum = _softmax_stats(z)
    probs = jnp.exp(z - m[:, None]) * inv_sum[:, None]
    greedy = jax.nn.one_hot(fast_argmax(logits), logits.shape[-1], dtype=jnp.float32)
    return jnp.where((params.temperature == 0)[:, None], greedy, probs)


def top_k_candidates(logits: jax.Array, params: SamplingParams, mode: FilterMode
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The filtered distribution of a batch where every row uses top-k (`mode.all_top_k`), read from its
    `mode.max_top_k` + 1 candidates only: (token ids [B, C], filtered scaled logits z [B, C] (−inf =
    dropped), complete: bool scalar). softmax(z) over the candidates IS `token_probs` of the non-greedy rows — top-p
    applied within the top-k set, on the same threshold — whenever `complete`; it is False only when some
    row keeps its last candidate (a tie of its k-th value), so that more ties past the candidates could be
    kept too."""
    n = min(mode.max_top_k + 1, logits.shape[-1])  # one more: if it is dropped, so is everything after it
    values, ids = jax.lax.top_k(logits, n)
    z = _apply_threshold(scale_logits(values, params.temperature), filter_threshold(logits, params, mode))
    return ids.astype(jnp.int32), z, (n == logits.shape[-1]) | ~jnp.any(z[:, -1] > _NEG_INF)


@functools.partial(jax.jit, static_argnames='mode')
def sample(key: jax.Array, logits: jax.Array, params: SamplingParams, mode: FilterMode) -> jax.Array:
    """One token per request [B] int32, drawn from `token_probs`. key: one per request [B] or one (`categorical`).

    When every row uses top-k, the draw is among the top-k candidates (Gumbel noise for C values a row instead
    of V: 14x faster for Gemma 3's 262,144-token vocabulary at top-k 20): the same distribution, another
    random stream. Rows whose k-th value may tie past the candidates take the full-row draw."""
    def full_row(key):
        return categorical(key, filter_logits(logits, params, mode))

    if mode.all_top_k and mode.max_top_k:
        ids, z, complete = top_k_candidates(logits, params, mode)
        drawn = jax.lax.cond(complete, lambda k: jnp.take_along_axis(ids, categorical(k, z)[:, None], 1)[:, 0],
                             full_row, key)
    else:
        drawn = full_row(key)
    greedy_rows = params.temperature == 0
    greedy = jax.lax.cond(jnp.any(greedy_rows), fast_argmax, lambda x: jnp.zeros(x.shape[:1], jnp.int32), logits)
    return jnp.where(greedy_rows, greedy, drawn).astype(jnp.int32)


# ---- token_probs without materialising it ----------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LazyTokenProbs:
    """`token_probs(logits, params, mode)` [T, V] read lazily: per row only the filter threshold, the max and
    the softmax normaliser 1 / Σ exp(z − max) of the filtered logits z, and the argmax (greedy rows) are kept.

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

    @property
    def shape(self) -> tuple[int, int]:
        return self.logits.shape

    @property
    def greedy(self) -> jax.Array:
        return self.temperature == 0

    def _filtered(self, rows: jax.Array, x: jax.Array) -> jax.Array:
        """Scaled, thresholded logits of `rows` (x: the raw logits there, rows' shape + optional trailing V)."""
        z = scale_logits(x, self.temperature[rows])
        return jnp.where(z >= self.threshold[rows][(...,) + (None,) * (x.ndim - rows.ndim)], z, _NEG_INF)

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
    argmax = jax.lax.cond(jnp.any(greedy), fast_argmax, lambda _: jnp.zeros((t,), jnp.int32), logits)

    def stats(logits):
        thr = filter_threshold(logits, params, mode)
        # the max of the filtered row is the scaled max logit (x · (1/T) is non-decreasing, the max is kept):
        # taken from the raw logits so that the scaled row is not materialised for two reductions
        m = scale_logits(jnp.max(logits, axis=-1), params.temperature)
        z = _apply_threshold(scale_logits(logits, params.temperature), thr)
        inv_sum = 1.0 / jnp.sum(jnp.exp(z - m[:, None]), axis=-1)
        thr = jnp.full((t,), _NEG_INF, jnp.float32) if thr is None else thr
        return thr, m, inv_sum

    def greedy_only(logits):
        return jnp.full((t,), _NEG_INF, jnp.float32), jnp.zeros((t,), jnp.float32), jnp.ones((t,), jnp.float32)

    thr, m, inv_sum = jax.lax.cond(jnp.all(greedy), greedy_only, stats, logits)
    return LazyTokenProbs(logits=logits, temperature=params.temperature, threshold=thr, row_max=m,
                          row_inv_sum=inv_sum, argmax=argmax)

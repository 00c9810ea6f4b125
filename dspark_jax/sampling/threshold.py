"""Per-row top-k / top-p thresholds on the scaled logits without a full sort, and filtering by them."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dspark_jax.sampling.exact_compare import TINY, gt_safe, gt_step
from dspark_jax.sampling.params import NEG_INF, FilterMode, SamplingParams, scale_logits

NUCLEUS_CANDIDATES = 1024  # top-p: the nucleus is looked for among this many top candidates before a full search


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
    t with 0 < |t| < 2^-100 (where `gt_step` is not exact) is moved to 0 or ±2^-100 when one of those lies
    inside; only a bracket entirely within the tiny range (row values there) takes an exact compare pass."""
    e = jnp.exp(x - m[:, None])
    k_zero, k_neg, k_pos = (_order_key(jnp.float32(v)) for v in (0.0, -TINY, TINY))
    lo = jnp.where(search, _order_key(jnp.full_like(hi, NEG_INF)), _order_key(hi) - 1)
    hi = _order_key(hi)

    def body(c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        inside = lambda k: (k > lo) & (k < hi)  # noqa: E731
        tiny = (mid > k_neg) & (mid < k_pos) & ~gt_safe(_from_order_key(mid))
        alt = jnp.where(inside(k_zero), k_zero, jnp.where(inside(k_neg), k_neg, jnp.where(inside(k_pos), k_pos, mid)))
        exact = tiny & (alt == mid)  # no safe probe inside the bracket
        mid = jnp.where(tiny, alt, mid)
        t = _from_order_key(mid)[:, None]
        mass = jax.lax.cond(jnp.any(exact), lambda: jnp.where(x > t, e, 0.0).sum(-1),
                            lambda: jnp.sum(e * gt_step(x, t), axis=-1))
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
    n_cand = min(max(mode.max_top_k, NUCLEUS_CANDIDATES) if mode.top_p and not cand_only else mode.max_top_k, v)
    # scaling is non-decreasing: the top values of the scaled row are the scaled top logits
    cand = scale_logits(jax.lax.top_k(logits, n_cand)[0], params.temperature)  # [B, C] descending
    kth = jnp.take_along_axis(cand, jnp.clip(k - 1, 0, n_cand - 1)[:, None], axis=-1)[:, 0]
    kth = jnp.where(k > 0, kth, NEG_INF)
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


def apply_threshold(x: jax.Array, threshold: jax.Array | None) -> jax.Array:
    if threshold is None:
        return x
    return jnp.where(x >= threshold[(...,) + (None,) * (x.ndim - threshold.ndim)], x, NEG_INF)


@functools.partial(jax.jit, static_argnames='mode')
def filter_logits(logits: jax.Array, params: SamplingParams, mode: FilterMode) -> jax.Array:
    """Float32 logits / temperature (`scale_logits`) with tokens outside top-k / top-p set to -inf. logits: [B, V]."""
    return apply_threshold(scale_logits(logits, params.temperature), filter_threshold(logits, params, mode))

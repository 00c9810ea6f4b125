"""Logits through a tied output embedding, without XLA:CPU's few-row matmul cliff.

On XLA:CPU a dot of 2–8 rows against a large table leaves the single-row (GEMV) kernel for Eigen's GEMM, which
packs the whole table on every call: for Gemma 3's 262,144 × 640 embedding, 2 rows cost ~2.5x one row and 8 rows
~2.8x (`benchmarks/lm_head.py`). A verification round at batch 1 computes exactly 2–8 rows (the draft plus the
bonus position), so the cliff made every drafted round cost twice a plain step before any token was accepted.
Written as a broadcast multiply and a sum over the embedding axis, the product is one fused loop that streams the
table once per call: ~1.6x cheaper than the GEMM at those row counts. Its inner loop runs over the rows in
vector-register groups of 8, so 16 and 24 rows (a batch of 8 verifying 1–2 drafts per request) also beat the GEMM
(68 vs 93 ms and 102 vs 117 ms; from 32 rows on they tie). 9–15 rows cost the fused loop as much as 16, still
less than the GEMM: they are padded to 16 rows (the 15-row draft head of a 15-token block, 32k rows: 6.7 vs 7.9 ms;
the 262k-row target head at 15 rows: 64 vs 82 ms; BENCHMARKS.md "Session 47"). 17–23 rows stay with the GEMM (padded
to 24 they measured 0.90–1.19x of it on the 262k table: no consistent gain).
Other row counts and other backends keep the einsum (GPU/TPU matmul units do not have this cliff).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

FUSED_ROWS = frozenset(range(2, 17)) | {24}  # where the fused loop beats XLA:CPU's GEMM (benchmarks/lm_head.py)


def fused_width(rows: int) -> int:
    """The rows the fused loop computes for `rows` in FUSED_ROWS: 9–15 padded to 16 (module doc)."""
    return 16 if 8 < rows < 16 else rows


def uses_fused_loop(rows: int, backend: str | None = None) -> bool:
    """Whether `tied_logits` computes `rows` rows with the fused loop on `backend` (default: JAX's default)."""
    return (backend or jax.default_backend()) == "cpu" and rows in FUSED_ROWS


def tied_logits(hidden: jax.Array, table: jax.Array) -> jax.Array:
    """hidden [..., d] · table [V, d]ᵀ → float32 logits [..., V]; equal to
    `einsum("...d,vd->...v", preferred_element_type=float32)` up to float summation order."""
    if hidden.shape[-1] != table.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the table's {table.shape[-1]}")
    lead = hidden.shape[:-1]
    rows = math.prod(lead)
    if not uses_fused_loop(rows):
        return jnp.einsum("...d,vd->...v", hidden, table, preferred_element_type=jnp.float32)
    return _padded_fused(hidden.reshape(rows, hidden.shape[-1]), table, fused_width(rows)).reshape(
        *lead, table.shape[0])


@functools.partial(jax.jit, static_argnames=("width",))
def _padded_fused(hidden: jax.Array, table: jax.Array, width: int) -> jax.Array:
    """`fused_logits` of hidden [R, d] zero-padded to `width` rows, cut back to R."""
    rows = hidden.shape[0]
    return fused_logits(jnp.pad(hidden, ((0, width - rows), (0, 0))), table)[:rows]


@jax.jit
def fused_logits(hidden: jax.Array, table: jax.Array) -> jax.Array:
    """hidden [R, d] · table [V, d]ᵀ → float32 [R, V] as one fused multiply-and-sum loop over [V, R, d], the
    vocabulary outermost, so each table row is read once for every hidden row (any R; `tied_logits` uses it for
    `FUSED_ROWS`). Jitted, so that an eager call is one fused program too: op by op the [V, R, d] product would be
    materialized (10.7 GB for Gemma 3's table at 16 rows)."""
    out = (table.astype(jnp.float32)[:, None, :] * hidden.astype(jnp.float32)[None, :, :]).sum(-1)
    return out.T

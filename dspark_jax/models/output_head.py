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

A table stored as Q8_0 blocks (the embedded GGUF's embedding: one float32 scale per 32 int8 values, the scale ×
value products exact in float32) is 180 MiB instead of the float32 table's 640 MiB. At `Q8_ROWS` rows on CPU
`q8_logits` streams the blocks instead: one `[1, d] @ dequant(q, scale)ᵀ` per row, which XLA:CPU compiles into its
vectorized matrix-vector loop with the dequantization fused in (it fuses producers into a dot only when one side
is a vector) — 6.9 / 13.6 / 20.3 ms at 1 / 2 / 3 rows against 22.7 / 28.9 / 28.4 ms for the float32 table, 29.2
against 28.4 at 4 (BENCHMARKS.md "Session 49", `benchmarks/q8_head.py`). Every XLA form over several rows at once (a loop
fusion with the block scale inside, a dot of the dequantized table, a map over vocabulary chunks) ran 25 ms to 2.4 s.
Where the CPU kernel of `q8_ffi` is built (a model's `head_q8_kernel`), 2 to `int8_linear.INT8_MAX_ROWS` rows go to
it instead: it dequantizes each block once for all rows (10 ms at 2–3 rows, 19 ms at 8; `q8_ffi` module doc).

A drafter's head is a subset of the same table (its draft vocabulary's rows): `HeadRows` carries those rows as a
float32 table and, where the target's head reads its blocks through the kernel, as the blocks' rows too;
`head_logits` picks the form by row count as the target's head does.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from dspark_jax.models.int8_linear import uses_int8_kernel
from dspark_jax.models.q8_ffi import int8_block_matmul

FUSED_ROWS = frozenset(range(2, 17)) | {24}  # where the fused loop beats XLA:CPU's GEMM (benchmarks/lm_head.py)
Q8_ROWS = frozenset({1, 2, 3})  # where one Q8_0 GEMV per row beats the float32 table (benchmarks/q8_head.py)


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


def uses_q8_blocks(rows: int, kernel: bool = False, backend: str | None = None) -> bool:
    """Whether `rows` rows are computed from Q8_0 blocks, where a model has them, on `backend` (default: JAX's):
    `Q8_ROWS` with XLA's matrix-vector loops, or with `kernel` the rows the `q8_ffi` kernel takes
    (`int8_linear.uses_int8_kernel`: 1 to `INT8_MAX_ROWS`; one row still goes to XLA's loop, `q8_logits`)."""
    if kernel:
        return uses_int8_kernel(rows, backend)
    return (backend or jax.default_backend()) == "cpu" and rows in Q8_ROWS


def q8_logits(hidden: jax.Array, q: jax.Array, scale: jax.Array, *, kernel: bool = False) -> jax.Array:
    """hidden [..., d] · table [V, d]ᵀ → float32 logits [..., V], the table given as Q8_0 blocks: values q int8
    [V, d] and scales float32 [V, d / B] (table[v, j] = scale[v, j // B] · q[v, j], B = d / scale.shape[1]); equal
    to `tied_logits` of the dequantized table up to float summation order. One row: XLA's matrix-vector loop.
    Several rows: with `kernel`, one pass of `q8_ffi.int8_block_matmul` (RuntimeError where it is not built);
    without, one matrix-vector loop per row (module doc: fast for few rows, `Q8_ROWS`; its cost grows with the
    rows)."""
    if hidden.shape[-1] != q.shape[-1] or q.shape[0] != scale.shape[0] or q.shape[-1] % scale.shape[-1]:
        raise ValueError(f"hidden [..., {hidden.shape[-1]}], q {q.shape} and scale {scale.shape} do not fit "
                         f"(q [V, d], scale [V, d / block])")
    lead, (v, d) = hidden.shape[:-1], q.shape
    flat = hidden.reshape(-1, d).astype(jnp.float32)
    if kernel and flat.shape[0] > 1:
        return int8_block_matmul(flat, q, scale).reshape(*lead, v)
    # tie the blocks to this call's rows: inside a decoding loop XLA would otherwise hoist the loop-invariant
    # dequantization out of the loop, materializing the float32 table and reading it at every step (measured:
    # a plain step at batch 1 twice as slow as the float32 head's)
    q, scale, flat = jax.lax.optimization_barrier((q, scale, flat))
    table = (q.astype(jnp.float32).reshape(v, scale.shape[1], -1) * scale[:, :, None]).reshape(v, d)
    rows = [flat[r:r + 1] @ table.T for r in range(flat.shape[0])]  # each a fused matrix-vector loop
    return jnp.concatenate(rows).reshape(*lead, v)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadRows:
    """Rows of a tied output embedding (a drafter's draft vocabulary): table float32 [N, d], and the same rows as
    the table's Q8_0 blocks — q8_values int8 [N, d], q8_scales float32 [N, d / B] — where the model's head reads
    them through the `q8_ffi` kernel (None: the table only). Built by `drafters.base.draft_head_rows`."""
    table: jax.Array
    q8_values: jax.Array | None = None
    q8_scales: jax.Array | None = None


def head_logits(hidden: jax.Array, head: HeadRows | jax.Array) -> jax.Array:
    """hidden [..., d] · head rows [N, d]ᵀ → float32 logits [..., N] (no soft-cap): from the Q8_0 blocks where
    `head` has them and `uses_q8_blocks(rows, kernel=True)` (1–64 rows on CPU: `q8_logits` — the kernel from 2 rows,
    XLA's matrix-vector loop at one), else `tied_logits` of the float32 table (a plain array `head` is that table),
    cast to hidden's dtype. The blocks are the table bit for bit, so for float32 hidden states both give the same
    logits up to float summation order; the blocks' path computes in float32 whatever hidden's dtype (a bfloat16
    drafter's logits then differ slightly by path: lossless either way, the drafts' distributions are returned)."""
    if isinstance(head, HeadRows):
        rows = math.prod(hidden.shape[:-1])
        if head.q8_values is not None and uses_q8_blocks(rows, kernel=True):
            return q8_logits(hidden, head.q8_values, head.q8_scales, kernel=True)
        head = head.table
    return tied_logits(hidden, head.astype(hidden.dtype))

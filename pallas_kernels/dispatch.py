"""One attention function for every model; the implementation is chosen here, not in model code.

`impl` (models pass their `attn_impl` string through):
  "reference"  pure-JAX einsum reference (`reference`), the default;
  "pallas"     the Pallas kernel: Triton lowering on GPU (`gpu_attention`), Mosaic on TPU (`tpu_attention`,
               untested on hardware), the GPU kernel in interpret mode on CPU;
  "interpret"  the GPU kernel in Pallas interpret mode on any backend (slow; for tests);
  "auto"       "pallas" on GPU/TPU, "reference" on CPU.
(Tests reach the Mosaic path on CPU by patching `kernel_backend`; off TPU it runs in TPU interpret mode.)
Explicit fallbacks to the reference (same results, no kernel): `kv_positions` given (the kernels assume key
slot s holds position s); queries and cache of different dtypes; on GPU a head_dim that is not a power of
two >= 16 or a dtype other than float32/bfloat16/float16 (Triton block-shape and dot limits).

Acceptance (rejection sampling) has no kernel on purpose; see README.md ("Why no acceptance kernel").
"""
from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from pallas_kernels import gpu_attention, reference, tpu_attention
from pallas_kernels.folding import causal_bounds, fold_queries, next_pow2, prefix_bounds, unfold_output


class AttentionImpl(str, enum.Enum):
    REFERENCE = "reference"
    PALLAS = "pallas"
    INTERPRET = "interpret"
    AUTO = "auto"


_TRITON_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_INTERPRET_CONFIG = gpu_attention.GpuConfig(k_splits=1)  # splits only pay off on a real GPU


def kernel_backend(impl: AttentionImpl | str) -> str:
    """What `impl` runs on this process's default backend: "reference", "triton", "mosaic" or "interpret"."""
    impl = AttentionImpl(impl)
    if impl is AttentionImpl.REFERENCE:
        return "reference"
    if impl is AttentionImpl.INTERPRET:
        return "interpret"
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "triton"
    if platform == "tpu":
        return "mosaic"
    return "interpret" if impl is AttentionImpl.PALLAS else "reference"


def _kernel_or_reference(impl: AttentionImpl | str, q: jax.Array, k: jax.Array, v: jax.Array) -> str:
    backend = kernel_backend(impl)
    d = q.shape[-1]
    if not q.dtype == k.dtype == v.dtype:
        return "reference"
    if backend == "triton" and (d < 16 or d != next_pow2(d) or q.dtype not in _TRITON_DTYPES):
        return "reference"
    return backend


def _folded_rows(backend: str, n: int) -> int:
    """Rows the folded queries are padded to: a power of two >= 16 for Triton, a multiple of 16 for Mosaic."""
    return -(-n // 16) * 16 if backend == "mosaic" else max(16, next_pow2(n))


def _ranged(backend: str, q_folded: jax.Array, lo: jax.Array, hi: jax.Array, kv: tuple[jax.Array, ...],
            scale: float) -> jax.Array:
    """The kernel of `backend` on folded queries; Mosaic off TPU runs in TPU interpret mode."""
    if backend == "mosaic":
        return tpu_attention.ranged_attention(q_folded, lo, hi, *kv, scale=float(scale),
                                              interpret=jax.default_backend() != "tpu")
    interpret = backend == "interpret"
    rows, head_dim = q_folded.shape[2:]
    config = _INTERPRET_CONFIG if interpret else gpu_attention.tuned_config(q_folded.dtype, head_dim, rows)
    return gpu_attention.ranged_attention(q_folded, lo, hi, *kv, scale=float(scale), interpret=interpret,
                                          config=config)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
              window: int | None = None, kv_positions: jax.Array | None = None,
              impl: AttentionImpl | str = AttentionImpl.REFERENCE) -> jax.Array:
    """Causal (optionally sliding-window) GQA attention of `q` against a KV cache. See `reference`."""
    backend = _kernel_or_reference(impl, q, k, v)
    if backend == "reference" or kv_positions is not None:
        return reference.causal_attention(q, k, v, q_positions, scale=scale, window=window,
                                          kv_positions=kv_positions)
    b, t, h, _ = q.shape
    s, kvh = k.shape[1], k.shape[2]
    rows = _folded_rows(backend, t * (h // kvh))
    lo, hi = causal_bounds(q_positions, h // kvh, rows, s, window)
    return unfold_output(_ranged(backend, fold_queries(q, kvh, rows), lo, hi, (k, v), scale), t, h)


def prefix_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cache_len: jax.Array, k_new: jax.Array,
                     v_new: jax.Array, q_positions: jax.Array, new_positions: jax.Array, *, scale: float,
                     window: int | None = None, impl: AttentionImpl | str = AttentionImpl.REFERENCE) -> jax.Array:
    """New tokens against a read-only cache prefix (slots < cache_len) and their own keys, causally; the cache is
    not written. See `reference.prefix_attention`. The kernels read one cache: for them the new keys are
    written into a copy of it (slots = their positions; padding dropped) and `attention` runs on that."""
    if _kernel_or_reference(impl, q, k_cache, v_cache) == "reference":
        return reference.prefix_attention(q, k_cache, v_cache, cache_len, k_new, v_new, q_positions, new_positions,
                                          scale=scale, window=window)
    b = q.shape[0]
    rows = jnp.where(new_positions >= 0, new_positions, k_cache.shape[1])  # out of range: dropped
    at = (jnp.arange(b)[:, None], rows)
    k = k_cache.at[at].set(k_new.astype(k_cache.dtype), mode="drop")
    v = v_cache.at[at].set(v_new.astype(v_cache.dtype), mode="drop")
    return attention(q, k, v, q_positions, scale=scale, window=window, impl=impl)


def block_attention(q: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array, ctx_len: jax.Array, blk_k: jax.Array,
                    blk_v: jax.Array, *, scale: float, impl: AttentionImpl | str = AttentionImpl.REFERENCE) -> jax.Array:
    """Drafter block attention (context prefix + bidirectional block). See `reference.block_attention`."""
    backend = _kernel_or_reference(impl, q, ctx_k, ctx_v)
    if backend == "reference":
        return reference.block_attention(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v, scale=scale)
    b, g, h, _ = q.shape
    s, kvh = ctx_k.shape[1], ctx_k.shape[2]
    group = h // kvh
    rows = _folded_rows(backend, g * group)
    if backend == "mosaic":  # no extra-keys operand: the block is written after the context
        kv = (tpu_attention.append_block(ctx_k, blk_k, ctx_len), tpu_attention.append_block(ctx_v, blk_v, ctx_len))
        lo, hi = prefix_bounds(jnp.minimum(ctx_len, s) + g, g, group, rows, s + g)
    else:
        kv = (ctx_k, ctx_v, blk_k, blk_v)
        lo, hi = prefix_bounds(ctx_len, g, group, rows, s)
    return unfold_output(_ranged(backend, fold_queries(q, kvh, rows), lo, hi, kv, scale), g, h)

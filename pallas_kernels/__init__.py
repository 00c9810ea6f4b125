"""Attention kernels for dspark-jax, each beside its pure-JAX reference.

`attention` (causal verification attention against a KV cache), `prefix_attention` (the same with the new keys
kept apart from a read-only cache) and `block_attention` (drafter block) are the entry points models call; `impl`
picks the pure-JAX reference (default) or the Pallas kernel (Triton on GPU, Mosaic on TPU, interpret mode
elsewhere). See `dispatch` and README.md.
"""
from pallas_kernels.dispatch import AttentionImpl, attention, block_attention, prefix_attention

__all__ = ["AttentionImpl", "attention", "block_attention", "prefix_attention"]

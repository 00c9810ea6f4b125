"""Attention kernels for dspark-jax, each beside its pure-JAX reference.

`attention` (causal, KV cache) and `block_attention` (drafter block) are the entry points models call. Today it always runs the pure-JAX
reference (`reference.causal_attention`); Pallas GPU/TPU kernels plug in behind the same signature.
"""
from pallas_kernels.dispatch import AttentionImpl, attention, block_attention

__all__ = ["AttentionImpl", "attention", "block_attention"]

"""Attention kernels for dspark-jax, each beside its pure-JAX reference.

`attention` is the single entry point every model calls. Today it always runs the pure-JAX
reference (`reference.causal_attention`); Pallas GPU/TPU kernels plug in behind the same signature.
"""
from pallas_kernels.dispatch import AttentionImpl, attention

__all__ = ["AttentionImpl", "attention"]

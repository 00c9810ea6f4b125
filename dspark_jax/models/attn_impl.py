"""The attention implementation as a static field of a model or drafter: part of its NNX graph definition, so a
jitted function that takes the graph definition as a static argument compiles once per implementation."""
from __future__ import annotations

from flax import nnx

from pallas_kernels import AttentionImpl


def check_attn_impl(impl: str) -> str:
    """`impl` if it names an attention implementation (`pallas_kernels.AttentionImpl`); ValueError otherwise."""
    names = [i.value for i in AttentionImpl]
    if impl not in names:
        raise ValueError(f"attn_impl must be one of {names}, got {impl!r}")
    return impl


def attn_impl_of(graphdef: nnx.GraphDef, state: nnx.State) -> str:
    """The implementation a model or drafter attends with ("reference" for one without attention)."""
    return getattr(nnx.merge(graphdef, state), "attn_impl", "reference")


def with_attn_impl(graphdef: nnx.GraphDef, state: nnx.State, impl: str) -> nnx.GraphDef:
    """The graph definition with every module that attends set to `impl` (the state is unchanged and still
    fits it). Raises ValueError for an unknown implementation."""
    check_attn_impl(impl)
    module = nnx.merge(graphdef, state)
    for _, sub in module.iter_modules():
        if hasattr(sub, "attn_impl"):
            sub.attn_impl = impl
    return nnx.split(module)[0]

"""`utils.trees`: a pytree's leaf shapes, the same for an array, its abstract shape and its tracer under jit."""
import jax
import jax.numpy as jnp

from dspark_jax.models.output_head import HeadRows
from dspark_jax.utils.trees import describe_tree, leaf_shapes


def test_leaf_shapes_and_description():
    table = jnp.zeros((4, 3), jnp.float32)
    assert leaf_shapes(HeadRows(table)) == [[".table", [4, 3], "float32"]]
    assert leaf_shapes(None) == [] and describe_tree(None) == "None"
    bare = describe_tree(table)
    assert describe_tree(jax.ShapeDtypeStruct((4, 3), jnp.float32)) == bare  # abstract: the same
    traced = []
    jax.jit(lambda t: traced.append(describe_tree(t)) or t)(table)
    assert traced == [bare]  # a tracer: the same
    assert describe_tree(HeadRows(table)) != bare and "HeadRows" in describe_tree(HeadRows(table))
    assert describe_tree(table.astype(jnp.bfloat16)) != bare and describe_tree(table[:3]) != bare

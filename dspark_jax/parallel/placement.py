"""Putting arrays onto a mesh and back, on one host or many.

On a multi-host run every process holds the same host-side values (it loaded the same target, read the
same batch); `put` then builds the global array from each process's addressable shards, and `to_host`
gathers a global array back into a full numpy value on every process.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, Sharding

from dspark_jax.parallel.rules import AxisRules, DEFAULT_RULES, batch_sharding, replicated, state_shardings


def put(x: Any, sharding: Sharding) -> jax.Array:
    """`x` (a host or single-device array with the same value on every process) placed with `sharding`."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)  # one process, or resharding an array that is already global
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_tree(tree: Any, shardings: Any) -> Any:
    """Places every leaf of `tree` with the sharding at the same place in `shardings`."""
    return jax.tree.map(put, tree, shardings)


def shard_state(state: nnx.State, mesh: Mesh, rules: AxisRules = DEFAULT_RULES) -> nnx.State:
    """An nnx State with every variable placed by its logical axis names."""
    return put_tree(state, state_shardings(state, mesh, rules))


def shard_batch(tree: Any, mesh: Mesh, rules: AxisRules = DEFAULT_RULES) -> Any:
    """Per-request / per-sequence arrays: the leading (batch) dimension split over `data` when divisible."""
    return jax.tree.map(lambda x: put(x, batch_sharding(np.shape(x), mesh, rules)), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda x: put(x, replicated(mesh)), tree)


def shardings_of(tree: Any) -> Any:
    """The shardings of a tree of placed arrays (e.g. for `jax.jit(out_shardings=...)`)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def opt_state_shardings(tx: optax.GradientTransformation, opt_state: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
    """Optimizer state laid out like the parameters it tracks (Adam moments), everything else
    (step counters, accumulation counters) replicated."""
    return optax.tree_map_params(tx, lambda _, s: s, opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated(mesh),
                                 is_leaf=lambda x: isinstance(x, (NamedSharding, nnx.Variable)))


def to_host(tree: Any) -> Any:
    """Numpy copies of every leaf, gathered across processes where an array is not fully addressable."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(one, tree)

"""Logical-axis sharding rules: logical names (carried by every `nnx.Param` as `sharding_names`) → mesh
axes → `PartitionSpec` / `NamedSharding`.

Default table (tensor parallelism over `model`, data parallelism over `data`):

    batch → data          heads, kv_heads, mlp → model        vocab, draft_vocab → model
    embed → — (data with fsdp=True)      sequence, head_dim, features, markov, norm → —   (replicated)

A dimension whose size is not divisible by its mesh axes is replicated instead (e.g. a vocabulary of
97 on model=4, or batch 3 on data=2): the result is the same, only memory and speed differ. Mesh axes
the mesh lacks (no `model` axis under `--mesh data=8`) and an axis already used by an earlier dimension
of the same array are dropped the same way. Variables without names (counters, vocabulary maps,
calibration temperatures and biases) are replicated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AxisRules:
    """(logical name, mesh axes) pairs; an empty tuple means replicated."""
    rules: tuple[tuple[str, MeshAxes], ...]

    def mesh_axes(self, name: str | None) -> MeshAxes:
        if name is None:
            return ()
        for logical, axes in self.rules:
            if logical == name:
                return axes
        raise ValueError(f"logical axis {name!r} has no sharding rule (known: "
                         f"{', '.join(n for n, _ in self.rules)}); add it to dspark_jax.parallel.rules")

    def replace(self, **changes: MeshAxes) -> "AxisRules":
        """The same table with some logical names mapped to other mesh axes."""
        for name in changes:
            self.mesh_axes(name)
        return AxisRules(tuple((n, tuple(changes.get(n, a))) for n, a in self.rules))


DEFAULT_RULES = AxisRules((
    ("batch", ("data",)),
    ("sequence", ()),
    ("embed", ()),
    ("heads", ("model",)),
    ("kv_heads", ("model",)),
    ("head_dim", ()),
    ("mlp", ("model",)),
    ("vocab", ("model",)),
    ("draft_vocab", ("model",)),
    ("features", ()),
    ("markov", ()),
    ("norm", ()),
))
FSDP_RULES = DEFAULT_RULES.replace(embed=("data",))


def make_rules(fsdp: bool = False) -> AxisRules:
    """Tensor + data parallelism; with `fsdp` the parameters' `embed` dimension is also split over `data`."""
    return FSDP_RULES if fsdp else DEFAULT_RULES


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: AxisRules) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `names` (None = replicated),
    replicating dimensions that are not divisible (see the module docstring)."""
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match an array of shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = tuple(a for a in rules.mesh_axes(name) if mesh.shape.get(a, 1) > 1 and a not in used)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]  # fall back to fewer axes, finally to replication
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = variable.get_metadata()
    names = meta.get("out_sharding", meta.get("sharding_names"))
    return None if names is None else tuple(names)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: AxisRules = DEFAULT_RULES) -> nnx.State:
    """The `NamedSharding` of every variable of an nnx State (same structure), from its logical names."""
    def one(v):
        if not _is_variable(v):  # a bare array leaf
            return replicated(mesh)
        value = v.get_value()
        names = _names(v)
        spec = PartitionSpec() if names is None else logical_spec(names, value.shape, mesh, rules)
        return v.replace(NamedSharding(mesh, spec))
    return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_sharding(shape: Sequence[int], mesh: Mesh, rules: AxisRules = DEFAULT_RULES) -> NamedSharding:
    """Leading dimension over the `batch` axes (when divisible), the rest replicated."""
    if not shape:
        return replicated(mesh)
    return NamedSharding(mesh, logical_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh, rules))

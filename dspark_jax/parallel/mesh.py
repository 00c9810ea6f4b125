"""Device meshes from a flag string: `--mesh data=2,model=4`.

Axis names: `data` (requests / training sequences; also parameters under FSDP) and `model` (tensor
parallelism: attention heads, MLP columns, vocabulary). The sizes must multiply to the number of devices
(all processes' devices together on a multi-host run).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "model")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Ordered (axis name, size) pairs; `data` first so that requests split across the slowest links."""
    axes: tuple[tuple[str, int], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s for _, s in self.axes)

    @property
    def num_devices(self) -> int:
        return math.prod(self.sizes)

    def __str__(self) -> str:
        return ",".join(f"{n}={s}" for n, s in self.axes)


def parse_mesh(spec: str) -> MeshShape:
    """`"data=2,model=4"` → MeshShape; axes are put in canonical order (data, model). ValueError on a
    malformed string, an unknown or repeated axis, or a size < 1."""
    if not spec or not spec.strip():
        raise ValueError("--mesh is empty: expected axis=size pairs such as 'data=8' or 'data=2,model=4'")
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        name, sep, value = item.strip().partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"bad --mesh entry {item!r} in {spec!r}: expected axis=size, e.g. 'data=2,model=4'")
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {spec!r}: axes are {', '.join(MESH_AXES)}")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name!r} needs an integer size, got {value.strip()!r}") from None
        if size < 1:
            raise ValueError(f"mesh axis {name!r} must have size >= 1, got {size}")
        sizes[name] = size
    return MeshShape(tuple((n, sizes[n]) for n in MESH_AXES if n in sizes))


def make_mesh(spec: str | MeshShape, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `jax.sharding.Mesh` (auto axes: the compiler propagates shardings) over `devices` (default: all
    devices of all processes). ValueError when the sizes do not multiply to the device count."""
    shape = parse_mesh(spec) if isinstance(spec, str) else spec
    devices = list(jax.devices() if devices is None else devices)
    if shape.num_devices != len(devices):
        raise ValueError(f"--mesh {shape} needs {shape.num_devices} devices but {len(devices)} are available "
                         f"({devices[0].platform if devices else 'none'}); the axis sizes must multiply to the "
                         f"device count")
    return jax.make_mesh(shape.sizes, shape.names, axis_types=(AxisType.Auto,) * len(shape.axes), devices=devices)

"""Multi-process JAX: `jax.distributed.initialize()` before any device is touched.

`dspark ... --distributed` (or a launcher that sets JAX_COORDINATOR_ADDRESS) calls it; JAX then finds the
coordinator, process count and process id itself on Cloud TPU pod slices, under SLURM (srun), Open MPI
and Kubernetes, or from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
"""
from __future__ import annotations

import logging
import os

import jax

ENV_TRIGGER = "JAX_COORDINATOR_ADDRESS"


def wants_distributed(flag: bool) -> bool:
    """True when asked with --distributed or when a launcher exported JAX_COORDINATOR_ADDRESS."""
    return flag or bool(os.environ.get(ENV_TRIGGER))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins this process to the multi-process JAX runtime (idempotent). Unset arguments come from the
    environment: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or the TPU / SLURM / MPI
    cluster JAX detects."""
    if jax.distributed.is_initialized():
        return
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"jax.distributed.initialize failed ({e}); launch one process per host/GPU with "
                         f"srun or on every TPU worker, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                         f"JAX_PROCESS_ID (see launch/README.md)") from e
    logging.info("process %d/%d: %d local of %d devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """Process 0: the one that writes logs, metrics and exported files."""
    return jax.process_index() == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None

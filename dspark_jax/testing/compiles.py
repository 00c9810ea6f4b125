"""Counting XLA compilations in tests: "nothing recompiles under load" made checkable."""
from __future__ import annotations

from typing import Callable

import jax


def counting_compiles(fn: Callable[[], object]) -> list[str]:
    """The XLA backend compilations `fn()` runs, as JAX's monitoring event names (a listener registered for
    the call and removed after it, also when `fn` raises)."""
    compiles: list[str] = []

    def listener(event: str, secs: float, **kw) -> None:
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return compiles

"""A one-line description of the machine, recorded with every benchmark result."""
from __future__ import annotations

import os
import platform


def describe_machine() -> str:
    import jax
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return f"{cpu} ({os.cpu_count()} cores), JAX backend {jax.default_backend()}: {jax.device_count()} x {devices}"

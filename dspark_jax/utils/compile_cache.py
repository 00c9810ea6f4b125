"""A persistent XLA compilation cache for the CLI: a command's executables (the jitted loop, the engine's
buckets, the trainer's step) are written to disk once and read back by later runs on this machine, so a second
`dspark generate` or `dspark serve` starts without recompiling (session 26: BENCHMARKS.md)."""
from __future__ import annotations

import os
from pathlib import Path

from dspark_jax.utils.files import cache_dir

ENV = "DSPARK_XLA_CACHE"
MAX_BYTES = 2 << 30  # least recently used entries go past this
MIN_COMPILE_S = 0.0  # every program: `dspark generate` also compiles a dozen small ones (second run 58 → 54 s)


def compilation_cache_dir() -> Path | None:
    """`$DSPARK_XLA_CACHE` (set but empty: no cache), default `<cache_dir()>/xla`."""
    value = os.environ.get(ENV)
    if value is None:
        return cache_dir() / "xla"
    return Path(value) if value else None


def enable_compilation_cache() -> Path | None:
    """Points JAX's persistent compilation cache at `compilation_cache_dir()` (programs that compile in under a
    second are not kept; at most 2 GiB) unless one is configured already (e.g. by the test suite); returns the
    directory in use, or None when disabled."""
    import jax
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    directory = compilation_cache_dir()
    if directory is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    return directory

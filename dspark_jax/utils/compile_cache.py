"""A persistent XLA compilation cache for the CLI: a command's executables (the jitted loop, the engine's
buckets, the trainer's step) are written to disk once and read back by later runs on this machine, so a second
`dspark generate` or `dspark serve` starts without recompiling (session 26: BENCHMARKS.md)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from dspark_jax.utils.files import cache_dir

ENV = "DSPARK_XLA_CACHE"
MAX_BYTES_ENV = "DSPARK_XLA_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 2 << 30  # least recently used entries go past this
CACHE_SUFFIX, ATIME_SUFFIX = "-cache", "-atime"  # the file names of JAX's LRU cache (jax/_src/lru_cache.py)
# Only programs that take a second to compile: JAX's eviction reads every entry's access time on each write
# (0.5 s per write at ~6,000 entries, session 27), so the cache stays small; the dozen sub-second programs of
# `dspark generate` cost ~4 s per run (session 26: second run 58 s with them uncached, 54 s cached).
MIN_COMPILE_S = 1.0


def compilation_cache_dir() -> Path | None:
    """`$DSPARK_XLA_CACHE` (`~` expanded; set but blank: no cache), default `<cache_dir()>/xla`
    (`$DSPARK_CACHE_DIR/xla`)."""
    value = os.environ.get(ENV)
    if value is None:
        return cache_dir() / "xla"
    return Path(value.strip()).expanduser() if value.strip() else None


def compilation_cache_max_bytes() -> int:
    """`$DSPARK_XLA_CACHE_MAX_BYTES` (-1: no limit, no eviction), default 2 GiB. ValueError unless an integer
    that is -1 or positive."""
    text = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"${MAX_BYTES_ENV} must be an integer (bytes, -1 for no limit), got {text!r}") from None
    if value == 0 or value < -1:
        raise ValueError(f"${MAX_BYTES_ENV} must be positive or -1 (no limit), got {value}")
    return value


def enable_compilation_cache() -> Path | None:
    """Points JAX's persistent compilation cache at `compilation_cache_dir()` (`configure_compilation_cache`)
    unless one is configured already (by the test suite, or by JAX's own `$JAX_COMPILATION_CACHE_DIR`, which JAX
    reads at import: that directory is used, with JAX's settings); returns the directory in use, or None when
    disabled — also when the directory cannot be used (one line on stderr says why: the command runs on,
    compiling as without a cache). ValueError for a bad `$DSPARK_XLA_CACHE_MAX_BYTES`."""
    import jax
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    directory = compilation_cache_dir()
    if directory is None:
        return None
    max_bytes = compilation_cache_max_bytes()
    try:
        return configure_compilation_cache(directory, max_bytes)
    except OSError as e:
        print(f"dspark: compilation cache off: cannot use {directory} ({e}); set ${ENV} to a writable "
              f"directory, or to '' to silence this", file=sys.stderr)
        return None


def configure_compilation_cache(directory: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                                min_compile_s: float = MIN_COMPILE_S) -> Path:
    """JAX's persistent compilation cache in `directory` (made if missing): programs that took `min_compile_s`
    to compile, least recently used entries evicted past `max_bytes` (-1: never). With eviction on, JAX reads an
    access-time file per entry whenever it writes one, and an entry without it (written by a process with no
    limit) makes every later write fail with a warning: such entries get one here. Returns `directory`; OSError
    when it cannot be made or written."""
    import jax
    directory = directory.expanduser().absolute()
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write_probe_{os.getpid()}"  # os.access says yes to root where writes still fail
    probe.write_bytes(b"")
    probe.unlink()
    if max_bytes != -1:
        add_missing_access_times(directory)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def add_missing_access_times(directory: Path) -> int:
    """Writes `<key>-atime` (8 bytes, little-endian ns, as JAX's LRU cache does; the entry's modification time)
    for every `<key>-cache` entry of `directory` that has none; returns how many were written."""
    added = 0
    for entry in directory.glob(f"*{CACHE_SUFFIX}"):
        atime = entry.with_name(entry.name[:-len(CACHE_SUFFIX)] + ATIME_SUFFIX)
        if not atime.exists():
            atime.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
            added += 1
    return added

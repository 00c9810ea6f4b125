"""The Q8_0 output head's CPU kernel (`q8_ffi.cc`): built on first use, called through `jax.ffi`.

XLA:CPU fuses a Q8_0 dequantization into its matrix-vector loop for one row only; for 2 and more rows it reads the
640 MiB float32 table (`output_head` module doc). The kernel streams the 180 MiB of blocks once for all rows,
split over XLA's intra-op thread pool: on a 2-core AMD EPYC, 10 ms at 2–3 rows, 12 ms at 4, 19 ms at 8 and 39 ms at
16, against 30–36 / 48 ms for the float32 table (BENCHMARKS.md "Session 50", `benchmarks/q8_head.py`).

It is compiled for this machine (`-march=native`) with the C++ compiler found as `$CXX`, `c++`, `g++` or
`clang++`, into `cache_dir()/ffi`, keyed on the source, compiler, flags, jaxlib and CPU; compiling takes ~4 s
once. Where it cannot be built (not x86-64 Linux, no AVX2/FMA, no compiler, a compile error) `kernel_blocker`
says why and the head keeps its XLA forms. `DSPARK_Q8_KERNEL=0` turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from dspark_jax.utils.files import cache_dir

SOURCE = Path(__file__).with_name("q8_ffi.cc")
TARGET_NAME = "dspark_q8_logits"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def kernel_blocker() -> str | None:
    """Why the kernel is not available in this process (None when it is). Builds and registers it on first call."""
    if os.environ.get("DSPARK_Q8_KERNEL", "1") == "0":
        return "turned off by DSPARK_Q8_KERNEL=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernel is built for x86-64 Linux, this is {platform.system()} {platform.machine()}"
    flags = _cpu_flags()
    if not {"avx2", "fma"} <= flags:
        return "the CPU lacks AVX2/FMA"
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler ($CXX, c++, g++ or clang++)"
    try:
        library = _build(compiler, flags)
    except (OSError, subprocess.SubprocessError) as e:
        return f"building {SOURCE.name} failed: {e}"
    jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(str(library)).DsparkQ8Logits),
                                platform="cpu")
    return None


def kernel_available() -> bool:
    """Whether `ffi_q8_logits` can run here (`kernel_blocker`)."""
    return kernel_blocker() is None


def _build(compiler: str, cpu_flags: set[str]) -> Path:
    """The compiled library for this source, compiler, jaxlib and CPU: from the cache, or compiled into it
    atomically (concurrent processes each write a whole file)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), jax.ffi.include_dir(),
                                    jaxlib.__version__,
                                    " ".join(sorted(cpu_flags))]).encode()).hexdigest()[:16]
    library = cache_dir() / "ffi" / f"q8_ffi-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=library.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp],
                                capture_output=True, text=True, timeout=300)
        if result.returncode:
            raise subprocess.SubprocessError(result.stderr.strip()[-2000:])
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


def ffi_q8_logits(hidden: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """hidden [R, d] float32 · dequant(q int8 [V, d], scale float32 [V, d / B])ᵀ → float32 logits [R, V], B a
    multiple of 16 (Q8_0: 32). Equal to `output_head.q8_logits` up to float summation order. Raises RuntimeError
    where the kernel is not available (`kernel_blocker`), ValueError for shapes that do not fit."""
    blocker = kernel_blocker()
    if blocker is not None:
        raise RuntimeError(f"the Q8_0 head kernel is not available: {blocker}")
    if (hidden.ndim != 2 or q.ndim != 2 or scale.ndim != 2 or hidden.shape[1] != q.shape[1]
            or scale.shape[0] != q.shape[0] or not scale.shape[1] or q.shape[1] % scale.shape[1]
            or (q.shape[1] // scale.shape[1]) % 16):
        raise ValueError(f"ffi_q8_logits takes hidden [R, d], q [V, d] and scale [V, d / B] with B a multiple of 16, "
                         f"got {hidden.shape}, {q.shape} and {scale.shape}")
    out = jax.ShapeDtypeStruct((hidden.shape[0], q.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET_NAME, out, vmap_method="sequential")(
        hidden.astype(jnp.float32), q.astype(jnp.int8), scale.astype(jnp.float32))

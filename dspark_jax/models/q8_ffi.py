"""Few-row products with int8 block weights on CPU (`q8_ffi.cc`): built on first use, called through `jax.ffi`.

`int8_block_matmul` computes x [R, K] · W [N, K]ᵀ where W is stored as int8 values with one float32 scale (and
optionally one offset) per block of B values along K — the form the GGUF's Q8_0, Q5_0, Q6_K and Q4_K tensors take
once unpacked (`io.gguf_blocks`). XLA:CPU fuses such a dequantization into its matrix-vector loop for one row
only; for 2 and more rows it materializes the float32 matrix (`output_head` module doc). The kernel streams the
int8 blocks once for all rows, split over XLA's intra-op thread pool: for the embedded Gemma 3's 262,144 × 640
output head on a 2-core AMD EPYC, 10 ms at 2–3 rows, 12 ms at 4, 19 ms at 8 and 37 ms at 16, against 29–37 / 46
ms for the float32 table (BENCHMARKS.md "Session 50", `benchmarks/q8_head.py`).

It is compiled for this machine (`-march=native`) with the C++ compiler found as `$CXX`, `c++`, `g++` or
`clang++`, into `cache_dir()/ffi`, keyed on the source, compiler, flags, jaxlib and CPU (model and flags);
compiling takes ~4 s once. Where it cannot be built or loaded (not x86-64 Linux, no AVX2/FMA, no compiler, a
compile error, a cache folder that cannot hold executable code) `kernel_blocker` says why (logged from the compiler
on), the output head keeps XLA's forms and the layers their float32 weights. `DSPARK_Q8_KERNEL=0` turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
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
TARGETS = {"dspark_int8_scaled": "DsparkInt8Scaled", "dspark_int8_affine": "DsparkInt8Affine"}  # name: symbol
# -ffp-contract=off: scale · q - offset stays a product then a difference, as gguf-py dequantizes (bit-exact W)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_lines() -> dict[str, str]:
    """/proc/cpuinfo's first "model name" and "flags" lines (empty where unreadable)."""
    found: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "flags") and key not in found:
                found[key] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return found


@functools.cache
def kernel_blocker() -> str | None:
    """Why the kernel is not available in this process (None when it is). Builds and registers it on first call."""
    if os.environ.get("DSPARK_Q8_KERNEL", "1") == "0":
        return "turned off by DSPARK_Q8_KERNEL=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernel is built for x86-64 Linux, this is {platform.system()} {platform.machine()}"
    cpu = _cpu_lines()
    if not {"avx2", "fma"} <= set(cpu.get("flags", "").split()):
        return "the CPU lacks AVX2/FMA"
    compiler = _compiler()
    if compiler is None:
        return _warn("no C++ compiler ($CXX, c++, g++ or clang++)")
    try:
        library = _build(compiler, f"{cpu.get('model name', '')}\n{cpu.get('flags', '')}")
    except (OSError, subprocess.SubprocessError) as e:
        return _warn(f"building {SOURCE.name} failed: {e}")
    try:  # e.g. a cache directory mounted noexec, or a library missing a symbol
        loaded = ctypes.cdll.LoadLibrary(str(library))
        capsules = {name: jax.ffi.pycapsule(getattr(loaded, symbol)) for name, symbol in TARGETS.items()}
    except (OSError, AttributeError) as e:
        return _warn(f"loading {library} failed: {e}")
    for name, capsule in capsules.items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return None


def _warn(blocker: str) -> str:
    """`blocker`, logged once: on a machine that could run the kernel, its absence costs ~1.5x at batch 1."""
    logging.getLogger(__name__).warning("the int8 block kernel is not available (%s): the model reads float32 "
                                        "weights instead (slower on CPU)", blocker)
    return blocker


def kernel_available() -> bool:
    """Whether `int8_block_matmul` can run here (`kernel_blocker`)."""
    return kernel_blocker() is None


def _build(compiler: str, cpu: str) -> Path:
    """The compiled library for this source, compiler, jaxlib and CPU: from the cache, or compiled into it
    atomically (concurrent processes each write a whole file)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), jax.ffi.include_dir(),
                                    jaxlib.__version__,
                                    cpu]).encode()).hexdigest()[:16]
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


def int8_block_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, offset: jax.Array | None = None) -> jax.Array:
    """x [R, K] float32 · W [N, K]ᵀ → float32 [R, N], where
    W[n, k] = scale[n, k // B] · q[n, k] − offset[n, k // B] (no offset: 0), q int8 [N, K], scale and offset float32 [N, K / B], B a multiple of 16 (Q8_0 / Q5_0 / Q4_K: 32,
    Q6_K: 16). W is the dequantized matrix bit for bit; the result equals `x @ W.T` up to float summation order.
    Raises RuntimeError where the kernel is not available (`kernel_blocker`), ValueError for shapes that do not
    fit."""
    blocker = kernel_blocker()
    if blocker is not None:
        raise RuntimeError(f"the int8 block kernel is not available: {blocker}")
    if (x.ndim != 2 or q.ndim != 2 or scale.ndim != 2 or not q.shape[1] or x.shape[1] != q.shape[1]
            or scale.shape[0] != q.shape[0] or not scale.shape[1] or q.shape[1] % scale.shape[1]
            or (q.shape[1] // scale.shape[1]) % 16 or (offset is not None and offset.shape != scale.shape)):
        raise ValueError(f"int8_block_matmul takes x [R, K], q [N, K] and scale (and offset) [N, K / B] with B a "
                         f"multiple of 16, got {x.shape}, {q.shape}, {scale.shape}"
                         + ("" if offset is None else f" and {offset.shape}"))
    out = jax.ShapeDtypeStruct((x.shape[0], q.shape[0]), jnp.float32)
    operands = [x.astype(jnp.float32), q.astype(jnp.int8), scale.astype(jnp.float32)]
    if offset is None:
        return jax.ffi.ffi_call("dspark_int8_scaled", out, vmap_method="sequential")(*operands)
    return jax.ffi.ffi_call("dspark_int8_affine", out, vmap_method="sequential")(*operands,
                                                                                 offset.astype(jnp.float32))

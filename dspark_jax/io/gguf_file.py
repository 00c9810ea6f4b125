"""A small, fast GGUF reader: header, metadata and lazily dequantized tensors.

`gguf.GGUFReader` builds numpy views for every metadata array (262k tokenizer entries for Gemma 3)
and takes ~11 s to open the default model; this parser reads the header in ~0.2 s and memory-maps
the tensor data. Dequantization is delegated to `gguf.quants.dequantize`.
"""
from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np

from dspark_jax.utils.bfloat16 import bits_to_float32

GGUF_MAGIC = b"GGUF"
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_TYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """A GGUF file is missing, truncated, corrupted or unsupported."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), i.e. reversed GGUF dims
    qtype: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF header (needed {n} bytes at offset {self.pos}, "
                            f"file has {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        return bytes(self.take(n)).decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _NUMPY_TYPES:
                dt = np.dtype(_NUMPY_TYPES[itype])
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).copy()
            if itype == _STRING:
                return [self.string() for _ in range(count)]
            return [self.value(itype) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown GGUF metadata value type {vtype} at offset {self.pos}")


class GGUFFile:
    """Parsed GGUF file. `metadata` is a dict; `tensors` maps names to `TensorInfo`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise GGUFError(f"GGUF file not found: {self.path}")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._mmap), self.path)
        if bytes(cur.take(4)) != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic bytes)")
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version}")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            ndim = cur.scalar("<I")
            dims = [cur.scalar("<Q") for _ in range(ndim)]
            raw.append((name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # local: heavy import
        for name, shape, qtype, rel in raw:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            except (ValueError, KeyError) as e:
                raise GGUFError(f"{self.path}: tensor {name!r} has unknown type {qtype}") from e
            nbytes = int(np.prod(shape)) // block * type_size
            info = TensorInfo(name, shape, qtype, data_start + rel, nbytes)
            if info.offset + nbytes > len(self._mmap):
                raise GGUFError(f"{self.path}: truncated file: tensor {name!r} ends at byte "
                                f"{info.offset + nbytes} but the file has {len(self._mmap)} bytes")
            self.tensors[name] = info

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def field(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: missing required metadata key {key!r}")
        return self.metadata[key]

    def is_q8_0(self, name: str) -> bool:
        """Whether the tensor is stored as Q8_0 (GGUFError for a missing one)."""
        from gguf import GGMLQuantizationType
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: missing tensor {name!r}")
        return GGMLQuantizationType(self.tensors[name].qtype) == GGMLQuantizationType.Q8_0

    def q8_0_blocks(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """A Q8_0 tensor [..., D] as its blocks — values q int8 [..., D] and scales d float32 [..., D / 32], the
        value at j being d[j // 32] · q[j] (exact in float32: what `dequantize` returns) — or None when the tensor
        is stored in another type. Raises GGUFError for a missing tensor."""
        if not self.is_q8_0(name):
            return None
        blocks = self.int8_blocks(name)
        return blocks.values, blocks.scales

    def int8_blocks(self, name: str):
        """The tensor as `io.gguf_blocks.Int8Blocks` (int8 values, float32 scales and offsets per block; bit for bit
        what `dequantize` returns) where its type has that form (`INT8_BLOCK_TYPES`), else None. Raises GGUFError
        for a missing tensor."""
        from gguf import GGMLQuantizationType

        from dspark_jax.io.gguf_blocks import INT8_BLOCK_TYPES, unpack_int8_blocks
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: missing tensor {name!r}")
        info = self.tensors[name]
        type_name = GGMLQuantizationType(info.qtype).name
        if type_name not in INT8_BLOCK_TYPES:
            return None
        return unpack_int8_blocks(np.asarray(self._mmap[info.offset:info.offset + info.nbytes]), type_name, info.shape)

    def dequantize(self, name: str) -> np.ndarray:
        """Returns the tensor as float32 in numpy (outermost-first) layout."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: missing tensor {name!r}")
        info = self.tensors[name]
        raw = np.asarray(self._mmap[info.offset:info.offset + info.nbytes])
        qtype = GGMLQuantizationType(info.qtype)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            dt = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(qtype)
            if dt is None:  # bf16 -> f32
                arr = bits_to_float32(raw.view(np.uint16))
            else:
                arr = raw.view(dt).astype(np.float32)
            return arr.reshape(info.shape)
        rows = raw.reshape(int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1, -1)
        return np.asarray(dequantize(rows, qtype), dtype=np.float32).reshape(info.shape)

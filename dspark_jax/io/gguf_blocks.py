"""GGUF block-quantized tensors unpacked into int8 values with one float32 scale (and offset) per block: the form
`models.q8_ffi.int8_block_matmul` reads (W = scale · q − offset, computed as gguf-py dequantizes, so bit for bit the
tensor `GGUFFile.dequantize` returns).

| type | bytes per block | block | value |
|---|---|---|---|
| Q8_0 | 34 per 32 | 32 | d · q |
| Q5_0 | 22 per 32 | 32 | d · (q5 − 16) |
| Q4_K | 144 per 256 | 32 | (d · sc) · q4 − dmin · m (6-bit sc, m per 32) |
| Q6_K | 210 per 256 | 16 | (d · sc) · (q6 − 32) (int8 sc per 16) |

The unpacked form is 1.125–1.25 bytes per value (the float32 tensor: 4). Other types have no unpacking here.
"""
from __future__ import annotations

import dataclasses

import numpy as np

INT8_BLOCK_TYPES = ("Q8_0", "Q5_0", "Q4_K", "Q6_K")  # gguf-py's GGMLQuantizationType names
_BYTES = {"Q8_0": (32, 34), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210)}  # values, bytes per block


@dataclasses.dataclass(frozen=True)
class Int8Blocks:
    """W [..., K] as values int8 [..., K], scales float32 [..., K / block] and offsets (None: zero):
    W[..., k] = scales[..., k // block] · values[..., k] − offsets[..., k // block]."""
    values: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None

    @property
    def block(self) -> int:
        return self.values.shape[-1] // self.scales.shape[-1]

    def dequantize(self) -> np.ndarray:
        """The float32 tensor, computed as the kernel and gguf-py compute it (a product, then a difference)."""
        from dspark_jax.models.int8_linear import dequantize_blocks
        return dequantize_blocks(self.values, self.scales, self.offsets)


def unpack_int8_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> Int8Blocks:
    """A tensor of `shape` (outermost first; blocks along the last axis) stored as `type_name` in the uint8 bytes
    `raw`, unpacked. Raises ValueError for another type or bytes that do not fit the shape."""
    if type_name not in _BYTES:
        raise ValueError(f"no int8 unpacking for {type_name} (supported: {', '.join(INT8_BLOCK_TYPES)})")
    per_block, nbytes = _BYTES[type_name]
    *lead, k = shape
    if k % per_block or raw.size != int(np.prod(shape)) // per_block * nbytes:
        raise ValueError(f"{raw.size} bytes of {type_name} do not make a tensor of shape {tuple(shape)}")
    blocks = np.asarray(raw, np.uint8).reshape(-1, nbytes)
    values, scales, offsets = _UNPACK[type_name](blocks)
    return Int8Blocks(values.reshape(*lead, k), scales.reshape(*lead, -1),
                      None if offsets is None else offsets.reshape(*lead, -1))


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[:, 0].astype(np.float32)


def _q8_0(b):
    return b[:, 2:].view(np.int8), _f16(b[:, :2]), None


def _q5_0(b):
    n = b.shape[0]
    qh = np.ascontiguousarray(b[:, 2:6]).view(np.uint32) >> np.arange(32, dtype=np.uint32)  # [n, 32]: bit j
    low = b[:, 6:22].reshape(n, 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)  # values 0–15, then 16–31
    q = (low.reshape(n, 32) & 0x0F) | (((qh & 1).astype(np.uint8)) << 4)
    return (q.astype(np.int8) - np.int8(16)), _f16(b[:, :2]), None


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    packed = b[:, 4:16].reshape(n, 3, 4)
    lo, hi, mixed = packed[:, 0], packed[:, 1], packed[:, 2]  # 6-bit scales and mins of 8 sub-blocks
    sc = np.concatenate([lo & 0x3F, (mixed & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    m = np.concatenate([hi & 0x3F, (mixed >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    scales = d[:, None] * sc.astype(np.float32)  # [n, 8], exact: as gguf-py
    offsets = dmin[:, None] * m.astype(np.float32)
    q = b[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)  # sub-blocks 2i, 2i+1
    return (q & 0x0F).reshape(n, 256).astype(np.int8), scales, offsets


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ((ql & 0x0F).reshape(n, 8, 32) | ((qh & 0x03).reshape(n, 8, 32) << 4)).astype(np.int8) - np.int8(32)
    scales = _f16(b[:, 208:210])[:, None] * b[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    return q.reshape(n, 256), scales, None


_UNPACK = {"Q8_0": _q8_0, "Q5_0": _q5_0, "Q4_K": _q4_k, "Q6_K": _q6_k}

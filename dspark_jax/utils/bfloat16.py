"""bfloat16 on the host through `ml_dtypes` (numpy has no bfloat16 of its own): the one place raw bfloat16 bits
(GGUF BF16 tensors, the target cache's uint16 storage, drafters written before format 2) become numbers."""
from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def from_bits(bits: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bit patterns (uint16, any shape) → a bfloat16 array of the same shape (no copy)."""
    return np.ascontiguousarray(bits).view(np.uint16).view(BFLOAT16)


def bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bit patterns (uint16) → float32, exactly."""
    return from_bits(bits).astype(np.float32)


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float array → bfloat16 (round to nearest even, as jnp.astype(jnp.bfloat16))."""
    return np.asarray(x).astype(BFLOAT16)

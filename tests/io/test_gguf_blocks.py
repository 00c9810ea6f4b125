"""io.gguf_blocks: every supported block type unpacked to int8 values, scales and offsets is bit for bit gguf-py's
dequantized tensor (random blocks, every bit pattern of the packed fields), and bad input is refused."""
from __future__ import annotations

import numpy as np
import pytest

from dspark_jax.io.gguf_blocks import INT8_BLOCK_TYPES, unpack_int8_blocks

gguf = pytest.importorskip("gguf")


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes for a [rows, cols] tensor of `type_name`, with finite float16 scales (small, as real ones)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    per_block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // per_block, nbytes), dtype=np.uint8)
    f16_at = {"Q8_0": [0], "Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [nbytes - 2]}[type_name]
    for at in f16_at:
        raw[:, at:at + 2] = (rng.standard_normal(raw.shape[0]) * 1e-2).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


@pytest.mark.parametrize("type_name", INT8_BLOCK_TYPES)
@pytest.mark.parametrize("rows, cols", [(3, 256), (5, 512)])
def test_unpacked_blocks_are_gguf_pys_dequantized_tensor(type_name, rows, cols):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    raw = random_blocks(type_name, rows, cols, seed=rows)
    blocks = unpack_int8_blocks(raw, type_name, (rows, cols))
    expected = dequantize(raw.reshape(rows, -1), GGMLQuantizationType[type_name]).reshape(rows, cols)
    assert blocks.values.dtype == np.int8 and blocks.values.shape == (rows, cols)
    assert blocks.scales.dtype == np.float32
    assert blocks.block == {"Q6_K": 16}.get(type_name, 32)
    assert (blocks.offsets is not None) == (type_name == "Q4_K")
    np.testing.assert_array_equal(blocks.dequantize(), expected)


def test_value_ranges_are_the_formats():
    for type_name, low, high in [("Q5_0", -16, 15), ("Q4_K", 0, 15), ("Q6_K", -32, 31), ("Q8_0", -128, 127)]:
        values = unpack_int8_blocks(random_blocks(type_name, 64, 256), type_name, (64, 256)).values
        assert values.min() == low and values.max() == high, type_name


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no int8 unpacking for Q4_0"):
        unpack_int8_blocks(np.zeros(18, np.uint8), "Q4_0", (32,))
    with pytest.raises(ValueError, match="do not make a tensor of shape"):
        unpack_int8_blocks(np.zeros(33, np.uint8), "Q8_0", (32,))
    with pytest.raises(ValueError, match="do not make a tensor of shape"):
        unpack_int8_blocks(np.zeros(144, np.uint8), "Q4_K", (128,))  # not a whole 256-value block

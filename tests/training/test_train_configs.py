"""The shipped training configs (configs/train/*.py) load, and the comparison rows of issue 13 differ from the
shipped DSpark recipe only where they must."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dspark_jax.training.config_file import load_config_file
from dspark_jax.training.trainer import TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config_file(path), TrainConfig)


@pytest.mark.parametrize("name,changed", [
    ("gemma3_270m_dflash_lookup_g15.py", {"algorithm": "dflash", "markov_rank": 0}),
    ("gemma3_270m_eagle3_g15.py", {"algorithm": "eagle3", "markov_rank": 0, "lookup_inputs": 0,
                                   "ttt_queries": 48}),
])
def test_comparison_rows_share_the_shipped_recipe(name, changed):
    shipped = load_config_file(CONFIGS / "gemma3_270m_dspark_lookup_g15.py")
    other = load_config_file(CONFIGS / name)
    diff = {f.name: getattr(other, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(other, f.name) != getattr(shipped, f.name)}
    assert diff == changed
    assert other.ttt_queries in (0, shipped.num_anchors)  # Eagle3 trains from as many starts as DSpark's anchors

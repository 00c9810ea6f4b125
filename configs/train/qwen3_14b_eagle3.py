"""Eagle3 for Qwen3-14B (spec §5): 40 target layers, taps [1, 10, 19, 28, 37] (as DSpark)."""
import dataclasses
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

BASE = load_config_file(Path(__file__).with_name("qwen3_4b_eagle3.py"))

CONFIG = dataclasses.replace(BASE, target_layer_ids=(1, 10, 19, 28, 37))

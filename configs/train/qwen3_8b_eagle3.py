"""Eagle3 for Qwen3-8B (spec §5): identical ids and values to Qwen3-4B (both have 36 layers)."""
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

CONFIG = load_config_file(Path(__file__).with_name("qwen3_4b_eagle3.py"))

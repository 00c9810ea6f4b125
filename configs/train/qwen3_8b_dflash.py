"""DFlash for Qwen3-8B (spec §5)."""
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

CONFIG = load_config_file(Path(__file__).with_name("qwen3_4b_dflash.py"))

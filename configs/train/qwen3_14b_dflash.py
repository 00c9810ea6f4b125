"""DFlash for Qwen3-14B (spec §5)."""
import dataclasses
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

BASE = load_config_file(Path(__file__).with_name("qwen3_14b_dspark.py"))

CONFIG = dataclasses.replace(BASE, algorithm="dflash", markov_rank=0)

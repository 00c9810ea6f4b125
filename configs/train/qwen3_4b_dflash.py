"""DFlash for Qwen3-4B (spec §5): the DSpark config with markov_rank 0, no confidence head, CE only."""
import dataclasses
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

DSPARK = load_config_file(Path(__file__).with_name("qwen3_4b_dspark.py"))

CONFIG = dataclasses.replace(DSPARK, algorithm="dflash", markov_rank=0)

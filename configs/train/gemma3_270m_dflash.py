"""DFlash baseline for Gemma 3 270M: the default DSpark drafter's backbone and budget with both heads off."""
import dataclasses
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

DSPARK = load_config_file(Path(__file__).with_name("gemma3_270m_dspark.py"))

CONFIG = dataclasses.replace(DSPARK, algorithm="dflash", markov_rank=0)

"""DFlash at the shipped DSpark recipe's data and budget (issue 13, item 5's comparison row):
gemma3_270m_dspark_lookup_g15.py with both heads off — no Markov head (rank 0), no confidence head, the
DFlash loss weights (CE only, spec §2.6) — same backbone, lookup inputs, 15-token block, 32k draft vocabulary,
epochs, steps and seed."""
import dataclasses
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

DSPARK = load_config_file(Path(__file__).with_name("gemma3_270m_dspark_lookup_g15.py"))

CONFIG = dataclasses.replace(DSPARK, algorithm="dflash", markov_rank=0)

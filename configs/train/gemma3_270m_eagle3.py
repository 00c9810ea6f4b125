"""Eagle3 (the autoregressive TTT baseline) for the embedded Gemma 3 270M, on the same budget as the shipped
DSpark drafter (configs/train/gemma3_270m_dspark.py): one draft layer, the same taps, draft vocabulary, lr,
epochs and batch; TTT length 7 with step decay 0.8 (spec §2.9)."""
import dataclasses
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

DSPARK = load_config_file(Path(__file__).with_name("gemma3_270m_dspark.py"))

CONFIG = dataclasses.replace(DSPARK, algorithm="eagle3", num_layers=1, markov_rank=0)

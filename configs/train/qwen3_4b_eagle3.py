"""Eagle3 for Qwen3-4B with the DeepSpec reference values (spec §5, §2.9): one draft layer, full vocabulary,
taps [1, 9, 17, 25, 33] (as DSpark), TTT length 7 with step decay 0.8^k, lr 6e-4 with 4 % warmup, 10 epochs,
global batch 512, seed 0 (DSpark/DFlash use 42)."""
import dataclasses
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

DSPARK = load_config_file(Path(__file__).with_name("qwen3_4b_dspark.py"))

CONFIG = dataclasses.replace(DSPARK, algorithm="eagle3", num_layers=1, markov_rank=0, ttt_length=7, ttt_decay=0.8,
                             seed=0)

"""Eagle3 at the shipped DSpark recipe's data and budget (issue 13, item 5's comparison row):
gemma3_270m_dspark_lookup_g15.py as the paper's Eagle3 — one draft layer, the same taps, 32k draft vocabulary,
lr, epochs, batch and seed; 15 draft tokens at inference (block_size), TTT length 7 with step decay 0.8 in
training (spec §2.9) from 48 sampled draft starts per sequence (`ttt_queries`, DSpark's `num_anchors`: the
reference's every-row TTT costs 17 s/step here, five times DSpark's positions). No lookup inputs: Eagle3
drafts autoregressively from its own hidden states and `DrafterConfig` refuses lookup inputs for it (they are our
deviation for the block drafters)."""
import dataclasses
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

DSPARK = load_config_file(Path(__file__).with_name("gemma3_270m_dspark_lookup_g15.py"))

CONFIG = dataclasses.replace(DSPARK, algorithm="eagle3", num_layers=1, markov_rank=0, lookup_inputs=0,
                             ttt_queries=DSPARK.num_anchors)

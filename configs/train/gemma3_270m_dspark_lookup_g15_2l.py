"""Two draft layers on all 2,889 shipped greedy responses (739k response tokens), 2 epochs (sessions 31–32's long
run, BENCHMARKS.md "Session 32"): gemma3_270m_dspark_lookup_g15.py (lookup inputs, 15-token block, 32k draft
vocabulary, taps 1, 8, 15) with num_layers 2. Held-out τ above the shipped one-layer drafter's, but not shipped: in
the main job (the hybrid, `--draft_length auto`) it was no faster (BENCHMARKS.md "Session 33")."""
import dataclasses
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

BASE = load_config_file(Path(__file__).with_name("gemma3_270m_dspark_lookup_g15.py"))

CONFIG = dataclasses.replace(BASE, num_layers=2, epochs=2)

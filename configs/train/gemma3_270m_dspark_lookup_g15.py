"""DSpark with lookup inputs, a 15-token block and a 32k draft vocabulary for the embedded Gemma 3 270M (session
30's recipe): gemma3_270m_dspark_lookup.py with gamma 15 (paper Fig. 4's draft length 16, spec §5) and
draft_vocab_size 32768 (the target's probability mass inside the draft vocabulary 0.918 → 0.957)."""
import dataclasses
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

BASE = load_config_file(Path(__file__).with_name("gemma3_270m_dspark_lookup.py"))

CONFIG = dataclasses.replace(BASE, gamma=15, draft_vocab_size=32768)

"""DSpark with lookup inputs for the embedded Gemma 3 270M (the shipped default since the copy fix): the
comparison config (gemma3_270m_dspark.py) plus prompt-lookup proposals (last 3..1 tokens) as block inputs,
trained on the greedy responses shipped in dspark_jax/data/train/ (sequences up to 512 tokens)."""
import dataclasses
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

BASE = load_config_file(Path(__file__).with_name("gemma3_270m_dspark.py"))

CONFIG = dataclasses.replace(BASE, lookup_inputs=3, epochs=10, max_len=512, checkpoint_every=100)

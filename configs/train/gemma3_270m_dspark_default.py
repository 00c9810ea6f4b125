"""The shipped default drafter (dspark_jax/drafters/shipped/gemma3_270m_dspark): the comparison config
(configs/train/gemma3_270m_dspark.py, 4 epochs, equal budget with DFlash and Eagle3) trained for 10 epochs."""
import dataclasses
from pathlib import Path

from dspark_jax.training.config_file import load_config_file

BASE = load_config_file(Path(__file__).with_name("gemma3_270m_dspark.py"))

CONFIG = dataclasses.replace(BASE, epochs=10, checkpoint_every=200)

"""The shipped default drafter (dspark_jax/drafters/shipped/gemma3_270m_dspark): the comparison config
(configs/train/gemma3_270m_dspark.py, 4 epochs, equal budget with DFlash and Eagle3) trained for 10 epochs."""
import dataclasses

from configs.train.gemma3_270m_dspark import CONFIG as BASE

CONFIG = dataclasses.replace(BASE, epochs=10, checkpoint_every=200)

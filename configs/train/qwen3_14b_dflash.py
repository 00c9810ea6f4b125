"""DFlash for Qwen3-14B (spec §5)."""
import dataclasses

from configs.train.qwen3_14b_dspark import CONFIG as BASE

CONFIG = dataclasses.replace(BASE, algorithm="dflash", markov_rank=0)

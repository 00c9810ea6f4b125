"""DFlash for Qwen3-4B (spec §5): the DSpark config with markov_rank 0, no confidence head, CE only."""
import dataclasses

from configs.train.qwen3_4b_dspark import CONFIG as DSPARK

CONFIG = dataclasses.replace(DSPARK, algorithm="dflash", markov_rank=0)

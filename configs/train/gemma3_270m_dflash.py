"""DFlash baseline for Gemma 3 270M: the default DSpark drafter's backbone and budget with both heads off."""
import dataclasses

from configs.train.gemma3_270m_dspark import CONFIG as DSPARK

CONFIG = dataclasses.replace(DSPARK, algorithm="dflash", markov_rank=0)

"""Eagle3 for Qwen3-14B (spec §5): 40 target layers, taps [1, 10, 19, 28, 37] (as DSpark)."""
import dataclasses

from configs.train.qwen3_4b_eagle3 import CONFIG as BASE

CONFIG = dataclasses.replace(BASE, target_layer_ids=(1, 10, 19, 28, 37))

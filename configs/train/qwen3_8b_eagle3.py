"""Eagle3 for Qwen3-8B (spec §5): identical ids and values to Qwen3-4B (both have 36 layers)."""
from configs.train.qwen3_4b_eagle3 import CONFIG  # noqa: F401

"""DFlash for Qwen3-8B (spec §5)."""
from configs.train.qwen3_4b_dflash import CONFIG  # noqa: F401

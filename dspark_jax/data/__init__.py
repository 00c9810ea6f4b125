"""Data files shipped with the package (benchmark prompts)."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

EVAL_DATASETS = ("gsm8k", "math500", "aime25", "humaneval", "mbpp", "mt-bench", "livecodebench", "arena-hard-v2")


def eval_dataset_path(name: str) -> Path:
    """Path of a shipped benchmark prompt file by name (e.g. "mt-bench")."""
    if name not in EVAL_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; shipped: {', '.join(EVAL_DATASETS)}")
    return Path(str(files("dspark_jax.data").joinpath("eval", f"{name}.jsonl")))

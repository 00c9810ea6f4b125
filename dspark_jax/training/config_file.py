"""Training configs are Python files defining CONFIG, a TrainConfig (configs/train/), loaded by path: a config may
build on another with `load_config_file(Path(__file__).with_name("other.py"))` (configs/ is not a package)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dspark_jax.training.trainer import TrainConfig


def load_config_file(path: str | os.PathLike) -> TrainConfig:
    """CONFIG of the Python file at `path`. FileNotFoundError / ValueError (no CONFIG, or not a TrainConfig)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_dspark_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = getattr(module, "CONFIG", None)
    if config is None:
        raise ValueError(f"{path} defines no CONFIG")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"{path}: CONFIG is a {type(config).__name__}, not a TrainConfig")
    return config

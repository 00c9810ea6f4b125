"""The module class of each trained drafter algorithm: the one place both building (factory) and loading
(checkpoint) look it up. DSpark and DFlash share DSparkDrafter (DFlash = no Markov / confidence head)."""
from __future__ import annotations

from dspark_jax.drafters.config import DrafterConfig
from dspark_jax.drafters.dspark import DSparkDrafter
from dspark_jax.drafters.eagle3 import Eagle3Drafter


def drafter_class(config: DrafterConfig) -> type:
    """Eagle3Drafter for algorithm 'eagle3', DSparkDrafter for 'dspark' / 'dflash'."""
    return Eagle3Drafter if config.algorithm == "eagle3" else DSparkDrafter

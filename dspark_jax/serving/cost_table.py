"""The SPS(B) cost table of the hardware-aware scheduler: profiled steps per second of the engine's step at each
verification bucket on one machine (`Engine.profile`, `dspark profile`), saved as JSON."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from dspark_jax.utils.files import atomic_write_text


@dataclasses.dataclass(frozen=True)
class CostTable:
    """Profiled steps/s per verification bucket (total tokens). SPS(B) for any B is the SPS of the smallest
    bucket >= B — exactly what a step of B tokens costs, cliffs included; B past the largest bucket → 0.
    `plain_steps_per_s`: steps/s of the draft-free step (target only, one token per slot); None when not
    profiled (the scheduler then never turns drafting off)."""
    buckets: tuple[int, ...]
    steps_per_s: tuple[float, ...]
    machine: str = ""
    plain_steps_per_s: float | None = None

    def __post_init__(self):
        if not self.buckets or len(self.buckets) != len(self.steps_per_s):
            raise ValueError("a cost table needs one steps/s value per bucket")
        if list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be strictly increasing positive token counts, got {self.buckets}")
        if any(not np.isfinite(s) or s <= 0 for s in self.steps_per_s):
            raise ValueError(f"steps/s must be positive, got {self.steps_per_s}")
        if self.plain_steps_per_s is not None and not (np.isfinite(self.plain_steps_per_s)
                                                       and self.plain_steps_per_s > 0):
            raise ValueError(f"plain steps/s must be positive, got {self.plain_steps_per_s}")

    def bucket_for(self, tokens: int) -> int | None:
        i = int(np.searchsorted(self.buckets, tokens))
        return self.buckets[i] if i < len(self.buckets) else None

    def sps(self, tokens: int) -> float:
        i = int(np.searchsorted(self.buckets, tokens))
        return self.steps_per_s[i] if i < len(self.buckets) else 0.0

    def to_json(self) -> dict:
        return dict(buckets=list(self.buckets), steps_per_s=list(self.steps_per_s), machine=self.machine,
                    plain_steps_per_s=self.plain_steps_per_s)

    @staticmethod
    def from_json(data: dict) -> "CostTable":
        try:
            plain = data.get("plain_steps_per_s")
            return CostTable(tuple(int(b) for b in data["buckets"]), tuple(float(s) for s in data["steps_per_s"]),
                             str(data.get("machine", "")), None if plain is None else float(plain))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a cost table (needs 'buckets' and 'steps_per_s'): {e}") from None

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2))

    @staticmethod
    def load(path: str | Path) -> "CostTable":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cost table {path} does not exist (run `dspark profile`)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"cost table {path} is not valid JSON: {e}") from None
        return CostTable.from_json(data)

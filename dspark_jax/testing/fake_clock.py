"""A clock tests set by hand (`clock.t = 5.0`), for code that takes a `clock: Callable[[], float]`."""
from __future__ import annotations


class FakeClock:
    """Returns `t` (seconds) when called."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

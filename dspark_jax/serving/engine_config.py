"""The engine's static configuration: slots, cache length, draft policy, verification and prompt buckets."""
from __future__ import annotations

import dataclasses

from dspark_jax.generation import bucket_length
from dspark_jax.models.attn_impl import check_attn_impl
from dspark_jax.sampling import FilterMode
from dspark_jax.serving.planner import POLICIES


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """slots: concurrent requests; max_len: cache rows per slot (prompt + max_new_tokens + G + 1 must fit);
    policy: plain | fixed (γ = gamma) | threshold (confidence >= threshold) | scheduler (Alg. 1, synchronous,
    early stop) | scheduler_async (§5.2: budget from confidences two steps old, fresh top-K ranking on
    device, next step dispatched before the current one is read); buckets: verification sizes in tokens
    (default: powers of two from slots up to slots·(G+1)); mode: sampling filters compiled in.
    plain_fallback (scheduler policies): when a draft step is not expected to beat the draft-free step
    (profiled SPS), steps run the target alone; after `probe_every` such steps one draft step refreshes the
    confidences the decision is made on (the interval doubles, up to 8×, while probes find drafting not
    paying). profile_steps, profile_passes: timed steps per bucket in each of the interleaved passes of the
    profile taken at start (`Engine.profile_timings`)."""
    slots: int = 8
    max_len: int = 512
    policy: str = "scheduler"
    gamma: int | None = None
    threshold: float = 0.5
    buckets: tuple[int, ...] | None = None
    mode: FilterMode = FilterMode()
    attn_impl: str = "reference"
    seed: int = 0
    plain_fallback: bool = True
    probe_every: int = 8
    profile_steps: int = 3
    profile_passes: int = 3
    kv_buckets: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        if self.max_len < 16:
            raise ValueError(f"max_len must be >= 16, got {self.max_len}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.gamma is not None and self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {self.probe_every}")
        if self.profile_steps < 1:
            raise ValueError(f"profile_steps must be >= 1, got {self.profile_steps}")
        if self.profile_passes < 1:
            raise ValueError(f"profile_passes must be >= 1, got {self.profile_passes}")
        check_attn_impl(self.attn_impl)
        if self.kv_buckets is not None:
            kv = tuple(self.kv_buckets)
            if not kv or list(kv) != sorted(set(kv)) or kv[0] < 1 or kv[-1] != self.max_len:
                raise ValueError(f"kv_buckets must be strictly ascending, >= 1, and end at max_len "
                                 f"({self.max_len}), got {self.kv_buckets}")

    @property
    def cache_lengths(self) -> tuple[int, ...]:
        """The cache lengths the step compiles for: `kv_buckets`, or max_len alone (every step attends over all
        rows). A ladder (`kv_buckets(max_len)`) is opt-in: on the 2-core CPU it cut a draft-free step at short
        contexts to 0.76x but left closed-loop tokens/s within noise (0.99-1.05x) for ~3x the engine's compile
        time (BENCHMARKS.md "Session 26")."""
        return tuple(self.kv_buckets) if self.kv_buckets is not None else (self.max_len,)


def default_buckets(slots: int, block: int) -> tuple[int, ...]:
    """Powers of two from `slots` up to slots·(G+1), plus slots·(G+1) itself."""
    top = slots * (block + 1)
    out, b = [], slots
    while b < top:
        out.append(b)
        b *= 2
    return tuple(out + [top])


def prompt_buckets(max_len: int) -> tuple[int, ...]:
    """Prompt widths compiled for admission: powers of two from 32 below max_len, and max_len."""
    out = []
    b = bucket_length(1)
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out + [max_len])


def kv_buckets(max_len: int, smallest: int = 128) -> tuple[int, ...]:
    """A ladder of cache lengths for the engine's step (`--kv_buckets=auto`): powers of two from `smallest` below
    max_len, and max_len (each adds a set of step executables, compiled at start; max_len <= smallest gives one)."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out + [max_len])

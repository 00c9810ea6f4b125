"""Requests to the serving engine: what a client asks for, its statistics, and validation against an engine's
limits. One enumeration of draft modes, shared with governance's policy files."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from dspark_jax.sampling import FilterMode, validate_sampling

DRAFT_MODES = ("hardware_aware", "static_threshold", "fixed", "off")  # a request's (or workload class's) draft policy
REQUEST_MODES = ("default",) + DRAFT_MODES  # "default": the engine's policy


@dataclasses.dataclass(frozen=True)
class Request:
    """prompt_ids: token ids (BOS included). draft_mode / max_draft / confidence_floor: per-request draft
    policy (default: the engine's); a governance layer fills them from the workload class."""
    prompt_ids: Sequence[int]
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: Sequence[int] | None = None  # extra stop tokens (the target's always stop)
    # random draws come from (seed, prompt) and the position: the same request and seed give the same tokens
    # whatever shares the batch, under per-request draft policies (`sampling.keys`); None: engine seed + request id
    seed: int | None = None
    draft_mode: str = "default"
    max_draft: int | None = None
    confidence_floor: float = 0.0


@dataclasses.dataclass
class RequestStats:
    prompt_tokens: int
    output_tokens: int = 0
    rounds: int = 0
    verified_draft: int = 0
    accepted_draft: int = 0
    no_draft_rounds: int = 0
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.submitted_at

    @property
    def tokens_per_s(self) -> float | None:
        lat = self.latency_s
        return self.output_tokens / lat if lat else None

    @property
    def accept_length(self) -> float | None:
        """Committed tokens per verification round (bonus included)."""
        return (self.output_tokens - 1) / self.rounds if self.rounds else None


class RequestError(ValueError):
    """A request the engine cannot serve (empty / over-long prompt, invalid sampling or policy)."""


def validate_request(r: Request, *, vocab_size: int, max_len: int, block: int, mode: FilterMode) -> None:
    """Raises RequestError naming what is wrong: an empty prompt, ids outside the vocabulary, more tokens than a
    slot of `max_len` rows holds (prompt + max_new_tokens + the draft block G + 1), sampling settings the engine's
    compiled `mode` cannot serve, an unknown draft mode or a bad cap / floor / stop id."""
    n = len(r.prompt_ids)
    if n == 0:
        raise RequestError("prompt is empty")
    if r.max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
    need = n + r.max_new_tokens + block + 1
    if need > max_len:
        raise RequestError(f"prompt of {n} tokens + max_new_tokens {r.max_new_tokens} + draft block "
                           f"{block + 1} = {need} exceeds the engine's max_len {max_len}")
    if max(r.prompt_ids) >= vocab_size or min(r.prompt_ids) < 0:
        raise RequestError("prompt contains token ids outside the target's vocabulary")
    try:
        validate_sampling(r.temperature, r.top_k, r.top_p)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if r.top_k > 0 and r.top_k > mode.max_top_k:
        raise RequestError(f"top_k={r.top_k} needs an engine compiled with FilterMode(max_top_k >= {r.top_k})")
    if r.top_p < 1.0 and not mode.top_p:
        raise RequestError("top_p < 1 needs an engine compiled with FilterMode(top_p=True)")
    if r.draft_mode not in REQUEST_MODES:
        raise RequestError(f"draft_mode must be one of {REQUEST_MODES}, got {r.draft_mode!r}")
    if r.max_draft is not None and r.max_draft < 0:
        raise RequestError(f"max_draft must be >= 0, got {r.max_draft}")
    if not 0.0 <= r.confidence_floor <= 1.0:
        raise RequestError(f"confidence_floor must be in [0, 1], got {r.confidence_floor}")
    if r.stop_ids is not None and any(not 0 <= t < vocab_size for t in r.stop_ids):
        raise RequestError("stop_ids contain token ids outside the target's vocabulary")


def first_stop(tokens: list[int], stop_ids: Sequence[int] | None) -> int | None:
    """Index of the first token of `tokens` in `stop_ids` (None: none, or no stop ids)."""
    if not stop_ids:
        return None
    hits = [j for j, t in enumerate(tokens) if t in stop_ids]
    return hits[0] if hits else None

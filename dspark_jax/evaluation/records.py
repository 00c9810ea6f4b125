"""Per-round statistics of speculative decoding as flat numpy arrays (all rounds of all requests)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

FIELDS = ("request", "proposed", "accepted", "committed", "accept_flags", "confidence", "confidence_logits",
          "model_forward", "lookup_draft", "lookup_expected")


@dataclasses.dataclass(frozen=True)
class RoundRecords:
    """One row per verification round, rounds of request 0 first.

    request [N] request index; proposed [N] draft tokens verified; accepted [N] leading draft tokens
    accepted; committed [N] tokens committed (bonus included; cut at a stop token or the budget);
    accept_flags [N, G] prefix-closed per-position flags (False past `proposed`); confidence [N, G] the
    c_k = σ(z_k / T_k) decoding used; confidence_logits [N, G] the raw z_k (0 without a confidence head);
    model_forward [N] bool: the round ran the drafter model's forward (`decoding.speculative.RoundStats`: False for
    prompt lookup and for a hybrid's rounds that skipped its model); lookup_draft [N] bool: the verified draft was a
    lookup draft (prompt lookup's, or a hybrid row that took its lookup's); lookup_expected [N]: the round's lookup
    proposal's expected accepted length (a hybrid's, whichever draft it verified; 0 for model drafters).
    (records.npz files written before session 44 lack the last two.)
    """
    request: np.ndarray
    proposed: np.ndarray
    accepted: np.ndarray
    committed: np.ndarray
    accept_flags: np.ndarray
    confidence: np.ndarray
    confidence_logits: np.ndarray
    model_forward: np.ndarray
    lookup_draft: np.ndarray
    lookup_expected: np.ndarray

    def __post_init__(self):
        n = len(self.request)
        for name in FIELDS:
            arr = getattr(self, name)
            if arr.shape[0] != n:
                raise ValueError(f"RoundRecords.{name} has {arr.shape[0]} rows, expected {n}")
        for name in ("accept_flags", "confidence", "confidence_logits"):
            if getattr(self, name).ndim != 2 or getattr(self, name).shape[1] != self.block_size:
                raise ValueError(f"RoundRecords.{name} must be [N, {self.block_size}]")

    @property
    def block_size(self) -> int:
        return self.accept_flags.shape[1]

    def __len__(self) -> int:
        return len(self.request)

    @classmethod
    def from_spec_output(cls, out, num_requests: int, first_request: int = 0) -> "RoundRecords":
        """The rounds r < rounds[b] of the first `num_requests` rows of a (host) `SpecOutput`; request
        indices start at `first_request`."""
        rounds = np.asarray(out.rounds)[:num_requests]
        rows = np.repeat(np.arange(num_requests), rounds)
        cols = np.concatenate([np.arange(r) for r in rounds]) if len(rounds) else np.zeros(0, int)
        pick = lambda a: np.asarray(a)[rows, cols]  # noqa: E731
        return cls(request=(rows + first_request).astype(np.int64), proposed=pick(out.proposed).astype(np.int64),
                   accepted=pick(out.accepted).astype(np.int64), committed=pick(out.committed).astype(np.int64),
                   accept_flags=pick(out.accept_flags).astype(bool),
                   confidence=pick(out.confidence).astype(np.float32),
                   confidence_logits=pick(out.confidence_logits).astype(np.float32),
                   model_forward=pick(out.model_forward).astype(bool),
                   lookup_draft=pick(out.lookup_draft).astype(bool),
                   lookup_expected=pick(out.lookup_expected).astype(np.float32))

    @classmethod
    def concatenate(cls, parts: Sequence["RoundRecords"], renumber: bool = True) -> "RoundRecords":
        """Rounds of several parts together; with `renumber` request indices are shifted so that the parts'
        requests stay distinct (without it they are kept, e.g. batches of one run)."""
        if not parts:
            raise ValueError("no records to concatenate")
        offset, requests = 0, []
        for p in parts:
            requests.append(p.request + offset)
            if renumber and len(p):
                offset += int(p.request.max()) + 1
        fields = {name: np.concatenate([getattr(p, name) for p in parts]) for name in FIELDS[1:]}
        return cls(request=np.concatenate(requests), **fields)

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {prefix + name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "") -> "RoundRecords":
        """The inverse of `to_arrays`: the records under `prefix` of a mapping of arrays (e.g. an opened
        records.npz). Raises ValueError naming the fields it lacks."""
        missing = [name for name in FIELDS if prefix + name not in arrays]
        if missing:
            raise ValueError(f"no round records under {prefix!r}: missing {', '.join(missing)}")
        return cls(**{name: np.asarray(arrays[prefix + name]) for name in FIELDS})

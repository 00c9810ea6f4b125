"""Training sequences: prompt + response token ids with a loss mask on the response, read from regenerated
responses, and the plan that splits them into cache shards."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence as SequenceABC

import numpy as np

from dspark_jax.data.responses import read_responses


@dataclasses.dataclass(frozen=True, eq=False)
class Sequence:
    """One training sample: `tokens` int32 [T] (prompt + response), `loss_mask` uint8 [T] (1 on the response)."""
    tokens: np.ndarray
    loss_mask: np.ndarray

    def __post_init__(self):
        if self.tokens.ndim != 1 or self.tokens.shape != self.loss_mask.shape:
            raise ValueError(f"tokens {self.tokens.shape} and loss_mask {self.loss_mask.shape} must be equal "
                             f"1-D shapes")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def make_sequence(prompt_ids: SequenceABC[int], response_ids: SequenceABC[int],
                  max_length: int | None = None) -> Sequence:
    """tokens = prompt + response, loss on the response (a final stop token included), cut to max_length."""
    tokens = np.asarray(list(prompt_ids) + list(response_ids), np.int32)
    mask = np.zeros(tokens.shape, np.uint8)
    mask[len(prompt_ids):] = 1
    if max_length is not None:
        tokens, mask = tokens[:max_length], mask[:max_length]
    return Sequence(tokens, mask)


def sequences_from_responses(path: str | os.PathLike, min_loss_tokens: int = 14,
                             max_length: int | None = None) -> list[Sequence]:
    """Training sequences from a `regenerate` JSONL file, in prompt-index order: tokens = prompt_ids +
    response_ids, loss_mask = 1 on the response tokens. Sequences are cut to `max_length`, then those with
    fewer than `min_loss_tokens` supervised tokens are dropped."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out = []
    for rec in read_responses(path):
        seq = make_sequence(rec["prompt_ids"], rec["response_ids"], max_length)
        if seq.num_loss_tokens >= min_loss_tokens and seq.num_loss_tokens > 0:
            out.append(seq)
    return out


def plan_shards(lengths: SequenceABC[int], shard_max_tokens: int) -> list[tuple[int, int]]:
    """Deterministic split of samples (in order) into [start, end) ranges of at most `shard_max_tokens`
    tokens each (a longer single sample gets a shard of its own)."""
    if shard_max_tokens < 1:
        raise ValueError(f"shard_max_tokens must be >= 1, got {shard_max_tokens}")
    shards, start, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and tokens + n > shard_max_tokens:
            shards.append((start, i))
            start, tokens = i, 0
        tokens += int(n)
    if len(lengths) > start:
        shards.append((start, len(lengths)))
    return shards


def sequences_digest(sequences: SequenceABC[Sequence]) -> str:
    h = hashlib.sha256()
    for s in sequences:
        h.update(np.int64(len(s)).tobytes())
        h.update(np.ascontiguousarray(s.tokens, np.int32).tobytes())
        h.update(np.ascontiguousarray(s.loss_mask, np.uint8).tobytes())
    return h.hexdigest()

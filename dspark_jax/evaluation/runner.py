"""Timed decoding for evaluation: plain, and speculative keeping every round's statistics.

Both run exactly what `generate_text` runs (`decode_batches`: same batching, padding, per-batch keys and
compiled executables, so outputs are identical); `decode_speculative` also keeps the per-round arrays of
`SpecOutput` that `Completion` summarises away. Timing is the wall time of the compiled calls (compilation
excluded), summed over batches.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from dspark_jax.evaluation.records import RoundRecords
from dspark_jax.generation import GenerationConfig, decode_batches, encode_prompts

Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class DecodeRun:
    """Generated ids per prompt, total new tokens and decoding seconds; `records` for speculative runs."""
    token_ids: tuple[tuple[int, ...], ...]
    new_tokens: int
    seconds: float
    records: RoundRecords | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def decode_plain(target, prompts: Sequence[str], config: GenerationConfig,
                 progress: Progress | None = None) -> DecodeRun:
    """Plain autoregressive decoding of `prompts`, exactly as `generate_text` runs it."""
    return _decode(target, None, prompts, config, 0.0, progress)


def decode_speculative(target, drafter, prompts: Sequence[str], config: GenerationConfig,
                       confidence_threshold: float = 0.0, progress: Progress | None = None) -> DecodeRun:
    """Speculative decoding of `prompts` with `drafter`, keeping every verification round."""
    return _decode(target, drafter, prompts, config, confidence_threshold, progress)


def _decode(target, drafter, prompts: Sequence[str], config: GenerationConfig, confidence_threshold: float,
            progress: Progress | None) -> DecodeRun:
    encoded = encode_prompts(target, prompts, config.max_new_tokens)
    ids, parts, seconds = [], [], 0.0
    for start, count, out, secs in decode_batches(target, encoded, config, drafter, confidence_threshold):
        seconds += secs
        ids += [tuple(int(t) for t in out.tokens[i, :int(out.num_tokens[i])]) for i in range(count)]
        if drafter is not None:
            parts.append(RoundRecords.from_spec_output(out, count, first_request=start))
        if progress:
            progress(len(ids), len(encoded))
    records = RoundRecords.concatenate(parts, renumber=False) if drafter is not None else None
    return DecodeRun(token_ids=tuple(ids), new_tokens=sum(len(t) for t in ids), seconds=seconds, records=records)

"""Timed decoding for evaluation: plain (via `generate_text`) and speculative keeping every round's statistics.

`decode_speculative` runs exactly what `generate_text(..., drafter=...)` runs (same batching, padding,
per-batch keys and compiled executables, so outputs are identical) but keeps the per-round arrays of
`SpecOutput` that `Completion` summarises away. Timing is the wall time of the compiled calls (compilation
excluded), summed over batches.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from dspark_jax.evaluation.records import RoundRecords
from dspark_jax.generation import GenerationConfig, encode_prompts, generate_text, pad_batch

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


def batch_seconds(completions: Sequence, batch_size: int) -> float:
    """Wall time of a `generate_text` result: each Completion carries its batch's time, so count one per batch."""
    bs = max(1, min(batch_size, len(completions)))
    return sum(c.seconds for i, c in enumerate(completions) if i % bs == 0)


def decode_plain(target, prompts: Sequence[str], config: GenerationConfig,
                 progress: Progress | None = None) -> DecodeRun:
    results = generate_text(target, prompts, config, progress=progress)
    return DecodeRun(token_ids=tuple(tuple(r.completion_ids) for r in results),
                     new_tokens=sum(r.new_tokens for r in results), seconds=batch_seconds(results, config.batch_size))


def decode_speculative(target, drafter, prompts: Sequence[str], config: GenerationConfig,
                       confidence_threshold: float = 0.0, progress: Progress | None = None) -> DecodeRun:
    """Speculative decoding of `prompts` with `drafter`, keeping every verification round."""
    from dspark_jax.decoding.sampling import FilterMode, SamplingParams
    from dspark_jax.decoding.speculative import speculative_generate
    from dspark_jax.generation import _compiled

    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
    encoded = encode_prompts(target, prompts, config.max_new_tokens)
    bs = min(config.batch_size, len(encoded))
    params = SamplingParams.create(bs, config.temperature, config.top_k, config.top_p)
    mode = FilterMode.for_params(config.top_k, config.top_p) if config.temperature > 0 else FilterMode()
    static = dict(target_graphdef=target.graphdef, drafter_graphdef=drafter.graphdef,
                  max_new_tokens=config.max_new_tokens, stop_ids=target.stop_ids, mode=mode,
                  pad_id=target.config.pad_token_id)
    fixed = dict(target_state=target.state, drafter_state=drafter.state,
                 confidence_threshold=jnp.float32(confidence_threshold))
    key = jax.random.key(config.seed)
    ids, parts, seconds = [], [], 0.0
    for start in range(0, len(encoded), bs):
        chunk = encoded[start:start + bs]
        tokens, lens = pad_batch(chunk, target.config.pad_token_id, bs)
        key, sub = jax.random.split(key)
        args = dict(fixed, prompts=jnp.asarray(tokens), prompt_lens=jnp.asarray(lens), key=sub, params=params)
        executable = _compiled(speculative_generate, static, args)
        t0 = time.perf_counter()
        out = jax.device_get(executable(**args))
        seconds += time.perf_counter() - t0
        ids += [tuple(int(t) for t in out.tokens[i, :int(out.num_tokens[i])]) for i in range(len(chunk))]
        parts.append(RoundRecords.from_spec_output(out, len(chunk), first_request=start))
        if progress:
            progress(len(ids), len(encoded))
    return DecodeRun(token_ids=tuple(ids), new_tokens=sum(len(t) for t in ids), seconds=seconds,
                     records=RoundRecords.concatenate(parts, renumber=False))

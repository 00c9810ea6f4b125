"""Host-side text generation API: tokenize, validate, bucket, run the jitted loop, detokenize, time."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.decoding.autoregressive import generate
from dspark_jax.decoding.sampling import FilterMode, SamplingParams, validate_sampling
from dspark_jax.target import Target


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        validate_sampling(self.temperature, self.top_k, self.top_p)


@dataclasses.dataclass(frozen=True)
class Completion:
    prompt: str
    completion_ids: list[int]
    completion_text: str
    new_tokens: int
    seconds: float  # wall time of the batch this prompt ran in (compilation excluded)
    tokens_per_s: float


def bucket_length(n: int, minimum: int = 32) -> int:
    """Prompt lengths are padded to powers of two (>= minimum) so few shapes ever compile."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def encode_prompts(target: Target, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """Tokenizes prompts (with BOS), rejecting empty and over-long ones with a clear message."""
    if not prompts:
        raise ValueError("no prompts given")
    limit = target.config.max_position_embeddings
    encoded = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"prompt {i} is empty")
        ids = target.tokenizer.encode(text, add_bos=True)
        if len(ids) + max_new_tokens > limit:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the model's context of {limit} tokens")
        encoded.append(ids)
    return encoded


def pad_batch(batch: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads to [batch_size, bucket]; missing rows repeat the last prompt (their output is dropped)."""
    rows = list(batch) + [batch[-1]] * (batch_size - len(batch))
    width = bucket_length(max(len(r) for r in rows))
    tokens = np.full((batch_size, width), pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return tokens, np.array([len(r) for r in rows], np.int32)


def generate_text(target: Target, prompts: Sequence[str], config: GenerationConfig = GenerationConfig(),
                  progress: Callable[[int, int], None] | None = None) -> list[Completion]:
    """Generates completions for `prompts` in batches of `config.batch_size` with the jitted AR loop."""
    encoded = encode_prompts(target, prompts, config.max_new_tokens)
    bs = min(config.batch_size, len(encoded))
    params = SamplingParams.create(bs, config.temperature, config.top_k, config.top_p)
    mode = FilterMode.for_params(config.top_k, config.top_p) if config.temperature > 0 else FilterMode()
    static = dict(graphdef=target.graphdef, max_new_tokens=config.max_new_tokens, stop_ids=target.stop_ids,
                  mode=mode, pad_id=target.config.pad_token_id)
    key = jax.random.key(config.seed)
    results: list[Completion] = []
    for start in range(0, len(encoded), bs):
        chunk = encoded[start:start + bs]
        tokens, lens = pad_batch(chunk, target.config.pad_token_id, bs)
        key, sub = jax.random.split(key)
        args = (target.state, jnp.asarray(tokens), jnp.asarray(lens), sub, params)
        compiled = generate.lower(*args[:0], state=args[0], prompts=args[1], prompt_lens=args[2], key=args[3],
                                  params=args[4], **static).compile()
        t0 = time.perf_counter()
        out = compiled(state=args[0], prompts=args[1], prompt_lens=args[2], key=args[3], params=args[4])
        out_tokens, counts = jax.device_get((out.tokens, out.num_tokens))
        seconds = time.perf_counter() - t0
        for i, ids in enumerate(chunk):
            n = int(counts[i])
            comp = [int(t) for t in out_tokens[i, :n]]
            results.append(Completion(prompt=prompts[start + i], completion_ids=comp,
                                      completion_text=target.tokenizer.decode(comp), new_tokens=n,
                                      seconds=seconds, tokens_per_s=n / seconds))
        if progress:
            progress(len(results), len(encoded))
    return results

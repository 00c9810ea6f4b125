"""Host-side text generation API: tokenize, validate, bucket, run the jitted loop, detokenize, time."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dspark_jax.decoding.autoregressive import generate
from dspark_jax.decoding.speculative import draft_head, speculative_generate
from dspark_jax.parallel.placement import replicate, shard_batch, shard_state, to_host
from dspark_jax.sampling import FilterMode, SamplingParams, validate_sampling
from dspark_jax.sampling.keys import request_key_data, request_keys
from dspark_jax.target import Target
from dspark_jax.models.attn_impl import check_attn_impl
from dspark_jax.round_costs import load_or_profile_round_costs


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    attn_impl: str = "reference"  # pallas_kernels.AttentionImpl: reference | pallas | interpret | auto
    # speculative only. "fixed": every round verifies the whole proposal (a round without drafts: one token);
    # "auto": per round, the verification bucket (rows: anchors + drafts, given first to the requests furthest
    # behind; at batch 1 the width) that shortens the batch's longest remaining request the most per second on
    # this machine's profiled round costs (`round_costs`, `decoding.draft_length`; at batch 1: the most expected
    # committed tokens per second), and plain rounds (no proposal) while drafting is expected to lose
    draft_length: str = "fixed"

    def __post_init__(self):
        if self.draft_length not in ("fixed", "auto"):
            raise ValueError(f"draft_length must be 'fixed' or 'auto', got {self.draft_length!r}")
        check_attn_impl(self.attn_impl)
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
    rounds: int | None = None  # speculative only: verification rounds
    mean_accept_len: float | None = None  # committed tokens per round (bonus included), pooled over rounds
    proposed: int | None = None  # draft tokens proposed over all rounds
    model_rounds: int | None = None  # rounds that ran the drafter model's forward (`RoundStats.model_forward`)


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


def decode_batches(target: Target, encoded: Sequence[Sequence[int]], config: GenerationConfig, drafter=None,
                   confidence_threshold: float = 0.0, mesh: Mesh | None = None) -> Iterator[tuple[int, int, Any, float]]:
    """Decodes token prompts in batches of `config.batch_size` (padded, one key per prompt from the seed and the
    prompt — `sampling.keys` —, compiled once per shape); yields (index of the batch's first prompt, its number of prompts, the batch's output on the host,
    seconds without compiling)."""
    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
    if drafter is None and confidence_threshold > 0:
        raise ValueError("confidence_threshold needs a drafter: without one decoding is plain")
    bs = min(config.batch_size, len(encoded))
    if mesh is not None:  # whole requests per data shard
        data = mesh.shape.get("data", 1)
        bs = -(-bs // data) * data
    params = SamplingParams.create(bs, config.temperature, config.top_k, config.top_p)
    mode = FilterMode.for_run(config.temperature, config.top_k, config.top_p)
    static = dict(max_new_tokens=config.max_new_tokens, stop_ids=target.stop_ids, mode=mode,
                  pad_id=target.config.pad_token_id)
    target = target.with_attn_impl(config.attn_impl)
    drafter = drafter and drafter.with_attn_impl(config.attn_impl)
    if drafter is None:
        fn, static = generate, dict(graphdef=target.graphdef, **static)
        fixed = dict(state=target.state)
    else:
        fn, static = speculative_generate, dict(target_graphdef=target.graphdef, drafter_graphdef=drafter.graphdef,
                                                **static)
        fixed = dict(target_state=target.state, drafter_state=drafter.state,
                     confidence_threshold=jnp.float32(confidence_threshold))
        # the drafter's head rows gathered once for every batch, not once per call (~24 ms each on a CPU); on a
        # mesh each call gathers them from the sharded embedding (a replicated copy would undo the vocabulary split)
        if mesh is None:
            head = draft_head(target.graphdef, target.state, drafter.graphdef, drafter.state)
            if head is not None:
                fixed["head"] = head
        if config.draft_length == "auto":
            if mesh is not None:
                raise ValueError("draft_length 'auto' profiles one device; it is not available with a mesh")
            costs = load_or_profile_round_costs(target, drafter, bs, bucket_length(max(len(p) for p in encoded)),
                                                config.max_new_tokens, temperature=config.temperature,
                                                top_k=config.top_k, top_p=config.top_p)
            static.update(costs.loop_settings())
    if mesh is not None:
        fixed = {k: shard_state(v, mesh) if k.endswith("state") else replicate(v, mesh) for k, v in fixed.items()}
        params = shard_batch(params, mesh)
    for start in range(0, len(encoded), bs):
        chunk = encoded[start:start + bs]
        tokens, lens = pad_batch(chunk, target.config.pad_token_id, bs)
        # one key per prompt from (seed, prompt): a prompt's tokens do not depend on what shares its batch
        key_data = np.asarray([request_key_data(config.seed, p) for p in chunk + [chunk[-1]] * (bs - len(chunk))],
                              np.uint32)
        keys = request_keys(key_data)
        args = dict(fixed, prompts=jnp.asarray(tokens), prompt_lens=jnp.asarray(lens), key=keys, params=params)
        if mesh is not None:
            args.update(shard_batch(dict(prompts=tokens, prompt_lens=lens, key=keys), mesh))
        executable = _compiled(fn, static, args)
        t0 = time.perf_counter()
        out = jax.device_get(executable(**args)) if mesh is None else to_host(executable(**args))
        yield start, len(chunk), out, time.perf_counter() - t0


def generate_text(target: Target, prompts: Sequence[str], config: GenerationConfig = GenerationConfig(),
                  progress: Callable[[int, int], None] | None = None, drafter=None,
                  confidence_threshold: float = 0.0, mesh: Mesh | None = None) -> list[Completion]:
    """Generates completions for `prompts` in batches of `config.batch_size`: plain autoregressive, or
    speculative with `drafter` (a `dspark_jax.drafters.factory.Drafter`).

    With a `mesh` (`dspark_jax.parallel.make_mesh`), weights are split by their logical axes (tensor
    parallelism over `model`) and requests over `data`; the batch is rounded up to a multiple of `data`."""
    encoded = encode_prompts(target, prompts, config.max_new_tokens)
    results: list[Completion] = []
    for start, count, out, seconds in decode_batches(target, encoded, config, drafter, confidence_threshold, mesh):
        for i in range(count):
            n = int(out.num_tokens[i])
            comp = [int(t) for t in out.tokens[i, :n]]
            extra = {}
            if drafter is not None:
                r = int(out.rounds[i])
                extra = dict(rounds=r, proposed=int(out.proposed[i, :r].sum()),
                             model_rounds=int(out.model_forward[i, :r].sum()),
                             mean_accept_len=float(out.committed[i, :r].sum() / r) if r else None)
            results.append(Completion(prompt=prompts[start + i], completion_ids=comp,
                                      completion_text=target.tokenizer.decode(comp), new_tokens=n,
                                      seconds=seconds, tokens_per_s=n / seconds, **extra))
        if progress:
            progress(len(results), len(encoded))
    return results


_EXECUTABLES: dict = {}
_MAX_EXECUTABLES = 32


def _compiled(fn, static: dict, args: dict):
    """Ahead-of-time compiled `fn` for these static arguments and argument shapes and shardings, kept across
    calls so that timing excludes compilation and repeated calls do not compile again. Sharded arguments
    make the compiled program sharded (their shardings are its input shardings)."""
    shapes = tuple((k, tuple(jax.tree.map(lambda a: (a.shape, str(a.dtype), getattr(a, "sharding", None)),
                                          jax.tree.leaves(v))))
                   for k, v in sorted(args.items()))
    key = (fn.__name__, tuple(sorted(static.items())), shapes)
    if key not in _EXECUTABLES:
        if len(_EXECUTABLES) >= _MAX_EXECUTABLES:
            _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
        _EXECUTABLES[key] = fn.lower(**args, **static).compile()
    return _EXECUTABLES[key]


def release_compiled_programs() -> None:
    """Drops every compiled XLA program: this module's executables and JAX's caches. A process that compiles
    many (drafters × widths × profiles, a test suite) otherwise exhausts the kernel's memory-map limit
    (vm.max_map_count) and XLA:CPU aborts while compiling."""
    import gc
    _EXECUTABLES.clear()
    jax.clear_caches()
    gc.collect()


def batch_seconds(results: Sequence[Completion], batch_size: int) -> float:
    """Wall time of all batches (each batch's prompts share its time; compilation excluded)."""
    bs = min(batch_size, len(results))
    return sum(r.seconds for i, r in enumerate(results) if i % bs == 0)


def throughput(results: Sequence[Completion], batch_size: int) -> float:
    """New tokens per second over all batches of `generate_text` results."""
    return sum(r.new_tokens for r in results) / batch_seconds(results, batch_size)


def pooled_accept_length(results: Sequence[Completion]) -> float | None:
    """Σ committed tokens in verification rounds / Σ rounds over all prompts (bonus included)."""
    rounds = sum(r.rounds or 0 for r in results)
    if not rounds:
        return None
    return sum((r.mean_accept_len or 0.0) * (r.rounds or 0) for r in results) / rounds

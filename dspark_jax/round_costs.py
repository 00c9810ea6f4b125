"""Measured cost of one round of the jitted speculative loop at each verification width on this machine, and of
a plain round (no proposal) — the cost curve behind the loop's hardware-aware draft length
(`decoding.draft_length`, DSpark §5: Θ = τ · SPS).

A round is timed whole, with the loop's own round code (`decoding.speculative.speculative_rounds`): the
drafter's proposal, the verification forward with its logits, rejection sampling, the drafter's commit and the
loop's bookkeeping. cost(w) = (time of `hi` rounds − time of `lo` rounds) / (hi − lo), so the prefill cancels.
Costs are profiled once per machine, target, drafter, batch, attention implementation and cache shape (prompt
bucket, new tokens) and cached as JSON under the user cache directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys

import jax
import jax.numpy as jnp

from dspark_jax.decoding.draft_length import efficient_widths
from dspark_jax.decoding.speculative import speculative_rounds
from dspark_jax.sampling import SamplingParams
from dspark_jax.target import Target
from dspark_jax.utils.files import atomic_write_text, cache_dir
from dspark_jax.utils.machine import describe_machine
from dspark_jax.utils.timing import median_seconds

FORMAT_VERSION = 3  # 1: verification forward + proposal timed apart; 2: a 64-token prompt's cache for every run


@dataclasses.dataclass(frozen=True)
class RoundCosts:
    """seconds[i]: one round verifying widths[i] tokens per request at `batch` requests (proposal and
    bookkeeping included); plain: one round without a proposal (the drafter's propose skipped)."""
    batch: int
    widths: tuple[int, ...]
    seconds: tuple[float, ...]
    plain: float
    machine: str = ""

    def efficient(self, max_widths: int = 5) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(widths, seconds) worth compiling into the loop (`draft_length.efficient_widths`)."""
        return efficient_widths(self.widths, self.seconds, max_widths)


def _profile_key(target: Target, drafter, batch: int, widths: tuple[int, ...], cache_shape: tuple[int, int]) -> str:
    raw = json.dumps([FORMAT_VERSION, describe_machine(), target.source, str(target.state_dtype), batch, list(widths),
                      list(cache_shape),
                      target.attn_impl, drafter.source, repr(drafter.config)], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def profile_round_costs(target: Target, drafter, batch: int, widths: tuple[int, ...], *, prompt_len: int = 64,
                        max_new_tokens: int = 64, repeats: int = 3, lo: int = 1, hi: int = 4) -> RoundCosts:
    """Times rounds of the speculative loop at every width in `widths` and plain rounds (median of `repeats`
    after a warm-up; one compilation for all of them), on prompts of `prompt_len` tokens at T = 0 with the
    KV cache of a `max_new_tokens` run (attention reads the whole cache buffer, so its length matters: profile
    with the run's own). A width's round costs at least a plain round (it adds the proposal), so timing noise
    below that is clipped. drafter: a `drafters.factory.Drafter`. Raises ValueError unless 1 <= lo < hi."""
    if not 1 <= lo < hi:
        raise ValueError(f"need 1 <= lo < hi rounds, got lo={lo}, hi={hi}")
    g = drafter.config.block_size
    vocab = target.config.vocab_size
    prompts = (jnp.arange(batch * prompt_len, dtype=jnp.int32).reshape(batch, prompt_len) * 7919 + 3) % vocab
    lens = jnp.full((batch,), prompt_len, jnp.int32)
    static = dict(target_graphdef=target.graphdef, drafter_graphdef=drafter.graphdef,
                  max_new_tokens=max(max_new_tokens, hi * (g + 1) + 2), stop_ids=(), pad_id=target.config.pad_token_id,
                  verify_widths=tuple(widths))
    params = SamplingParams.create(batch, 0.0, 0, 1.0)

    def run(choice: int, rounds: int):
        return speculative_rounds(target_state=target.state, drafter_state=drafter.state, prompts=prompts,
                                  prompt_lens=lens, key=jax.random.key(0), params=params,
                                  confidence_threshold=jnp.float32(0.0), choice=jnp.int32(choice),
                                  num_rounds=jnp.int32(rounds), **static)

    def per_round(choice: int) -> float:
        return max((median_seconds(lambda: run(choice, hi), repeats)
                    - median_seconds(lambda: run(choice, lo), repeats)) / (hi - lo), 1e-6)

    plain = per_round(-1)
    print(f"  plain round: {plain * 1e3:.1f} ms", file=sys.stderr, flush=True)
    seconds = []
    for i, w in enumerate(widths):
        seconds.append(max(per_round(i), plain))
        print(f"  round at width {w}: {seconds[-1] * 1e3:.1f} ms ({seconds[-1] / plain:.2f}x plain)",
              file=sys.stderr, flush=True)
    return RoundCosts(batch, tuple(widths), tuple(seconds), plain, describe_machine())


def load_or_profile_round_costs(target: Target, drafter, batch: int, prompt_len: int = 64, max_new_tokens: int = 64,
                                use_cache: bool = True) -> RoundCosts:
    """The cost of a round at every width 1..G+1 of `drafter` at `batch` and of a plain round, for prompts padded to
    `prompt_len` and `max_new_tokens` new tokens (the run's cache length), from the cache
    when this machine already profiled it, else profiled now (about a minute on a 2-core CPU for the embedded
    target, half of it compilation) and cached. A cache file that cannot be read is profiled again."""
    g = drafter.config.block_size
    widths = tuple(range(1, g + 2))
    key = _profile_key(target, drafter, batch, widths, (prompt_len, max_new_tokens))
    path = cache_dir() / "round_costs" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            data = json.loads(path.read_text())
            return RoundCosts(int(data["batch"]), tuple(data["widths"]), tuple(data["seconds"]), float(data["plain"]),
                              data["machine"])
        except (ValueError, KeyError, TypeError):
            print(f"round cost cache {path} is unreadable; profiling again", file=sys.stderr)
    print(f"profiling speculative rounds at widths 1..{g + 1} and plain rounds at batch {batch} (once per machine)"
          " ...", file=sys.stderr)
    costs = profile_round_costs(target, drafter, batch, widths, prompt_len=prompt_len, max_new_tokens=max_new_tokens)
    if use_cache:
        atomic_write_text(path, json.dumps(dataclasses.asdict(costs), indent=1))
    return costs

"""Measured cost of one round of the jitted speculative loop at each verification bucket (total rows, flat) on
this machine, and of a plain round (no proposal) — the cost curve behind the loop's hardware-aware draft length
(`decoding.draft_length`, DSpark §5: Θ = τ · SPS).

A round is timed whole, with the loop's own round code (`decoding.speculative.speculative_rounds`): the
drafter's proposal, the verification forward with its logits, rejection sampling, the drafter's commit and the
loop's bookkeeping. From one prefilled state, cost(w) = (time of `hi` rounds − time of `lo` rounds) / (hi − lo),
so the call overhead cancels; buckets are interleaved and the median taken over passes.
Costs are profiled once per machine, target, drafter structure, batch, attention implementation, cache shape
(prompt bucket, new tokens) and sampling kind (greedy, or sampled with its static top-k / top-p filters: a sampled
round computes the target's softmax over every verified row, the rejection draw and the drafter's sampling, which
greedy rounds skip at run time) and cached as JSON under the user cache directory. The drafter is keyed by its
structure and static settings (the configs of every module, `repr` of its graphdef), not by the name it was
loaded under nor its weights: equal configurations (`ngram` and `ngram:n_max=3,n_min=1`) cost the same and share
one profile — before session 14 they did not, and two profiles of one machine gave the same loop 0.99x and 0.91x
(BENCHMARKS.md "Session 14").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from dspark_jax.decoding.draft_length import efficient_buckets, profile_buckets
from dspark_jax.decoding.speculative import speculative_rounds, speculative_start
from dspark_jax.sampling import FilterMode, SamplingParams
from dspark_jax.target import Target
from dspark_jax.utils.files import atomic_write_text, cache_dir
from dspark_jax.utils.machine import describe_machine

FORMAT_VERSION = 9  # 1: verification forward + proposal timed apart; 2: a 64-token prompt's cache for every run;
# 3: every timing included a prefill; 4: 2–8-row logits through XLA:CPU's GEMM (`models.output_head`);
# 5: dense widths (every request anchor + w − 1 rows) instead of flat buckets; 6: rounds that copied the KV cache,
# 16- and 24-row logits through the GEMM; 7: plain rounds as a branch of the round's conditional; 8: plain rounds
# in their own loop; 9: profiled at the run's sampling kind (before: greedy rounds for every run)


@dataclasses.dataclass(frozen=True)
class RoundCosts:
    """seconds[i]: one round verifying a flat bucket of buckets[i] rows (anchors + drafts) at `batch` requests
    (proposal and bookkeeping included); plain: one round without a proposal (the drafter's propose skipped).
    At batch 1 a bucket is the verification width."""
    batch: int
    buckets: tuple[int, ...]
    seconds: tuple[float, ...]
    plain: float
    machine: str = ""

    def efficient(self, max_buckets: int = 5) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(buckets, seconds) worth compiling into the loop (`draft_length.efficient_buckets`)."""
        return efficient_buckets(self.buckets, self.seconds, max_buckets)

    def loop_settings(self, max_buckets: int = 5) -> dict:
        """`speculative_generate`'s verify_buckets / verify_costs / plain_cost for the gated loop (draft length
        "auto"): the efficient buckets, their seconds and the plain round's."""
        buckets, seconds = self.efficient(max_buckets)
        return dict(verify_buckets=buckets, verify_costs=seconds, plain_cost=self.plain)


def sampling_kind(temperature: float, top_k: int = 0, top_p: float = 1.0) -> tuple[bool, FilterMode]:
    """(sampled, filter mode): what of a run's sampling settings a round's cost depends on — whether it samples
    (temperature > 0) and, if so, the static filters it compiles (`FilterMode`); not the values themselves."""
    sampled = temperature > 0
    return sampled, FilterMode.for_run(temperature, top_k, top_p)


def _profile_key(target: Target, drafter, batch: int, buckets: tuple[int, ...], cache_shape: tuple[int, int],
                 sampling: tuple[bool, FilterMode]) -> str:
    """What a round's cost depends on: machine, target, drafter structure (module doc), batch, buckets, cache shape,
    sampling kind (`sampling_kind`)."""
    sampled, mode = sampling
    raw = json.dumps([FORMAT_VERSION, describe_machine(), target.source, str(target.state_dtype), batch, list(buckets),
                      list(cache_shape), target.attn_impl, repr(drafter.graphdef), sampled,
                      dataclasses.astuple(mode)], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def profile_round_costs(target: Target, drafter, batch: int, buckets: tuple[int, ...], *, prompt_len: int = 64,
                        max_new_tokens: int = 64, repeats: int = 5, lo: int = 1, hi: int = 5,
                        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> RoundCosts:
    """Times rounds of the speculative loop at every bucket in `buckets` (rows; `speculative_generate`'s
    verify_buckets) and plain rounds, on prompts of
    `prompt_len` tokens sampled as the run samples (`temperature`, `top_k`, `top_p`; at T = 0 greedy) with the
    KV cache of a `max_new_tokens` run (attention reads the whole cache
    buffer, so its length matters: profile with the run's own). One prefill, then from its state
    (time of `hi` rounds − time of `lo` rounds) / (hi − lo) per bucket, the buckets interleaved in each of
    `repeats` passes (slow drift of the machine's speed hits every bucket alike), median over the passes; one
    compilation for all. A bucket's round costs at least a plain round (it adds the proposal), so timing noise
    below that is clipped. drafter: a `drafters.factory.Drafter`. Raises ValueError unless 1 <= lo < hi and
    repeats >= 1."""
    if not 1 <= lo < hi or repeats < 1:
        raise ValueError(f"need 1 <= lo < hi rounds and repeats >= 1, got lo={lo}, hi={hi}, repeats={repeats}")
    g = drafter.config.block_size
    vocab = target.config.vocab_size
    prompts = (jnp.arange(batch * prompt_len, dtype=jnp.int32).reshape(batch, prompt_len) * 7919 + 3) % vocab
    lens = jnp.full((batch,), prompt_len, jnp.int32)
    sampled, mode = sampling_kind(temperature, top_k, top_p)
    static = dict(max_new_tokens=max(max_new_tokens, hi * (g + 1) + 2), stop_ids=(), verify_buckets=tuple(buckets),
                  mode=mode)
    params = SamplingParams.create(batch, temperature if sampled else 0.0, top_k if sampled else 0,
                                   top_p if sampled else 1.0)
    threshold = jnp.float32(0.0)
    state = speculative_start(target.graphdef, target.state, drafter.graphdef, drafter.state, prompts, lens,
                              jax.random.key(0), params, threshold, pad_id=target.config.pad_token_id, **static)

    def seconds(choice: int, rounds: int) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(speculative_rounds(target.graphdef, target.state, drafter.graphdef, drafter.state,
                                                 state, params, threshold, jnp.int32(choice), jnp.int32(rounds),
                                                 **static))
        return time.perf_counter() - t0

    choices = [-1, *range(len(buckets))]  # -1: plain rounds
    for c in choices:  # warm-up: compiles once, touches every branch
        seconds(c, lo)
    samples = {c: [] for c in choices}
    for _ in range(repeats):
        for c in choices:
            samples[c].append((seconds(c, hi) - seconds(c, lo)) / (hi - lo))
    plain = max(statistics.median(samples[-1]), 1e-6)
    print(f"  plain round: {plain * 1e3:.1f} ms", file=sys.stderr, flush=True)
    costs = []
    for i, t in enumerate(buckets):
        costs.append(max(statistics.median(samples[i]), plain))
        print(f"  round at bucket {t} ({t - batch} drafts): {costs[-1] * 1e3:.1f} ms ({costs[-1] / plain:.2f}x plain)",
              file=sys.stderr, flush=True)
    return RoundCosts(batch, tuple(buckets), tuple(costs), plain, describe_machine())


def load_or_profile_round_costs(target: Target, drafter, batch: int, prompt_len: int = 64, max_new_tokens: int = 64,
                                use_cache: bool = True, *, temperature: float = 0.0, top_k: int = 0,
                                top_p: float = 1.0) -> RoundCosts:
    """The cost of a round at every bucket of `draft_length.profile_buckets` (at batch 1: every width 1..G+1) of
    `drafter` at `batch` and of a plain round, for prompts padded to
    `prompt_len` and `max_new_tokens` new tokens (the run's cache length), sampled as the run samples
    (`temperature`, `top_k`, `top_p`: one profile per `sampling_kind`), from the cache
    when this machine already profiled it, else profiled now (about a minute on a 2-core CPU for the embedded
    target, half of it compilation) and cached. A cache file that cannot be read is profiled again."""
    g = drafter.config.block_size
    buckets = profile_buckets(batch, g)
    sampling = sampling_kind(temperature, top_k, top_p)
    key = _profile_key(target, drafter, batch, buckets, (prompt_len, max_new_tokens), sampling)
    path = cache_dir() / "round_costs" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            data = json.loads(path.read_text())
            return RoundCosts(int(data["batch"]), tuple(data["buckets"]), tuple(data["seconds"]), float(data["plain"]),
                              data["machine"])
        except (ValueError, KeyError, TypeError):
            print(f"round cost cache {path} is unreadable; profiling again", file=sys.stderr)
    print(f"profiling {'sampled' if sampling[0] else 'greedy'} speculative rounds at {len(buckets)} buckets"
          f" ({buckets[0]}..{buckets[-1]} rows) and plain rounds at batch {batch} (once per machine)"
          " ...", file=sys.stderr)
    costs = profile_round_costs(target, drafter, batch, buckets, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p)
    if use_cache:
        atomic_write_text(path, json.dumps(dataclasses.asdict(costs), indent=1))
    return costs

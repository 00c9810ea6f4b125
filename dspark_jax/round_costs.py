"""Measured cost of one round of the jitted speculative loop at each verification bucket (total rows, flat) on
this machine, and of a plain round (no proposal) — the cost curve behind the loop's hardware-aware draft length
(`decoding.draft_length`, DSpark §5: Θ = τ · SPS).

A round is timed whole, with the loop's own round code (`decoding.speculative.speculative_rounds`): the
drafter's proposal, the verification forward with its logits, rejection sampling, the drafter's commit and the
loop's bookkeeping. From one prefilled state, cost(w) = (time of `hi` rounds − time of `lo` rounds) / (hi − lo),
so the call overhead cancels; buckets are interleaved (each pass times a plain round, every bucket, and a plain
round again) and the median taken over passes (`time_rounds` keeps every pass: `RoundTimings`). A hybrid drafter
(`drafters.hybrid`) is timed twice at every bucket, interleaved: with its model's forward run in every round
(`seconds`) and skipped, lookup drafts only (`lookup_seconds`) — the loop prices each round by the kind it is
(before session 23 one table, timed with whatever the profile's prompts made the hybrid do, priced both).
Costs are profiled once per machine, target, drafter structure, batch, attention implementation, cache shape
(prompt bucket, new tokens) and sampling kind (greedy, or sampled with its static top-k / top-p filters: a sampled
round computes the target's softmax over every verified row, the rejection draw and the drafter's sampling, which
greedy rounds skip at run time) and cached as JSON under the user cache directory. The drafter is keyed by its
structure and static settings (the configs of every module, `repr` of its graphdef; choice options — a hybrid's,
a lookup's `calibrated` — excluded, `model_variants`), not by the name it was loaded under nor its weights: equal configurations (`ngram` and `ngram:n_max=3,n_min=1`) cost the same and share
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
from dspark_jax.drafters.factory import Drafter, is_hybrid, with_choice_defaults, with_skip_model_at
from dspark_jax.sampling import FilterMode, SamplingParams
from dspark_jax.target import Target
from dspark_jax.utils.files import atomic_write_text, cache_dir
from dspark_jax.utils.machine import describe_machine
from dspark_jax.utils.trees import leaf_shapes

FORMAT_VERSION = 17  # 1: verification forward + proposal timed apart; 2: a 64-token prompt's cache for every run;
# 3: every timing included a prefill; 4: 2–8-row logits through XLA:CPU's GEMM (`models.output_head`);
# 5: dense widths (every request anchor + w − 1 rows) instead of flat buckets; 6: rounds that copied the KV cache,
# 16- and 24-row logits through the GEMM; 7: plain rounds as a branch of the round's conditional; 8: plain rounds
# in their own loop; 9: profiled at the run's sampling kind (before: greedy rounds for every run); 10: a hybrid
# drafter's rounds timed with its model's forward forced on, and apart with it skipped (`lookup_seconds`); 11: 9–15-
# row logits (the draft head of a 15-token block at batch 1) padded into the fused loop (`models.output_head`);
# 12: 1–3-row logits from the embedding's Q8_0 blocks where the target has them (`models.output_head.q8_logits`);
# 13: 2–64-row logits from those blocks through the `models.q8_ffi` kernel where it is built, and the layers'
# projections from the GGUF's int8 blocks (`models.int8_linear`; both keyed); 14: the drafter's head from the same
# blocks' rows through the kernel (`drafters.base.draft_head_rows`; keyed by q8_kernel); 15: the drafter's state
# shapes keyed too (a corpus table of another size searches another number of steps); 16: greedy's argmax blocked
# (`sampling.fast_argmax`: ~2 ms less a plain round at batch 8, ~5 ms less a 16-row verification); 17: greedy rounds'
# finite check from the argmax's block sums (`sampling.argmax_and_finite`: ~0.6 ms less a round at batch 8)
PROGRESS_PRIOR = 4.0  # expected progress (tokens beyond plain rounds') the gated loop's objective is trusted for
# before its batch's drafted rounds say otherwise (`speculative._Rounds.progress_scale`)


@dataclasses.dataclass(frozen=True)
class RoundCosts:
    """seconds[i]: one round verifying a flat bucket of buckets[i] rows (anchors + drafts) at `batch` requests
    (proposal and bookkeeping included); plain: one round without a proposal (the drafter's propose skipped).
    At batch 1 a bucket is the verification width. lookup_seconds (hybrid drafters, else None): a round at each
    bucket that skips the model's forward."""
    batch: int
    buckets: tuple[int, ...]
    seconds: tuple[float, ...]
    plain: float
    machine: str = ""
    lookup_seconds: tuple[float, ...] | None = None

    def efficient(self, max_buckets: int = 5) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(buckets, seconds) worth compiling into the loop (`draft_length.efficient_buckets`)."""
        return efficient_buckets(self.buckets, self.seconds, max_buckets)

    def loop_settings(self, max_buckets: int = 5) -> dict:
        """`speculative_generate`'s verify_buckets / verify_costs / plain_cost (and lookup_costs for a hybrid)
        for the gated loop (draft length "auto"): the efficient buckets, their seconds and the plain round's, and
        the progress record's prior (`PROGRESS_PRIOR`)."""
        return self.settings_at(self.efficient(max_buckets)[0])

    def settings_at(self, buckets: tuple[int, ...]) -> dict:
        """`loop_settings` at the given profiled buckets (ascending, each one of `self.buckets`)."""
        at = [self.buckets.index(t) for t in buckets]
        settings = dict(verify_buckets=tuple(buckets), verify_costs=tuple(float(self.seconds[i]) for i in at),
                        plain_cost=self.plain, progress_prior=PROGRESS_PRIOR)
        if self.lookup_seconds is not None:
            settings["lookup_costs"] = tuple(float(self.lookup_seconds[i]) for i in at)
        return settings


def sampling_kind(temperature: float, top_k: int = 0, top_p: float = 1.0) -> tuple[bool, FilterMode]:
    """(sampled, filter mode): what of a run's sampling settings a round's cost depends on — whether it samples
    (temperature > 0) and, if so, the static filters it compiles (`FilterMode`); not the values themselves."""
    sampled = temperature > 0
    return sampled, FilterMode.for_run(temperature, top_k, top_p)


def _profile_key(target: Target, drafter, batch: int, buckets: tuple[int, ...], cache_shape: tuple[int, int],
                 sampling: tuple[bool, FilterMode]) -> str:
    """What a round's cost depends on: machine, target (its source, dtype, Q8_0 head, kernel, int8 layers), drafter structure (module
    doc) and its state's shapes and dtypes (not its values), batch, buckets, cache shape, sampling kind
    (`sampling_kind`)."""
    sampled, mode = sampling
    variant = model_variants(drafter)[0]
    raw = json.dumps([FORMAT_VERSION, describe_machine(), target.source, str(target.state_dtype), target.q8_head,
                      target.q8_kernel, target.int8_layers,
                      batch, list(buckets),
                      list(cache_shape), target.attn_impl, repr(variant.graphdef), leaf_shapes(variant.state),
                      sampled, dataclasses.astuple(mode)], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


@dataclasses.dataclass(frozen=True)
class RoundTimings:
    """A profile's raw timings, pass by pass: plain[p] seconds of a plain round in pass p (the mean of one timed
    at the start and one at the end of the pass), rounds[v][i][p] seconds of a round at buckets[i] of drafter
    variant v (`model_variants`) in pass p."""
    batch: int
    buckets: tuple[int, ...]
    plain: tuple[float, ...]
    rounds: tuple[tuple[tuple[float, ...], ...], ...]

    def costs(self) -> RoundCosts:
        """The profile's `RoundCosts`: each bucket's median seconds over the passes, clipped to at least the median
        plain round (a round adds the proposal to a plain round). (Pricing each round against its own pass's plain
        round instead does not make profiles of this 2-core machine more repeatable: BENCHMARKS.md "Session 24",
        `benchmarks/profile_repeatability.py`.)"""
        plain = max(statistics.median(self.plain), 1e-6)
        tables = [tuple(max(statistics.median(times), plain) for times in variant) for variant in self.rounds]
        return RoundCosts(self.batch, self.buckets, tables[0], plain, describe_machine(),
                          lookup_seconds=tables[1] if len(tables) > 1 else None)


def time_rounds(target: Target, drafter, batch: int, buckets: tuple[int, ...], *, prompt_len: int = 64,
                max_new_tokens: int = 64, repeats: int = 5, lo: int = 1, hi: int = 5, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0) -> RoundTimings:
    """Times rounds of the speculative loop at every bucket in `buckets` (rows; `speculative_generate`'s
    verify_buckets) and plain rounds, on prompts of `prompt_len` tokens sampled as the run samples
    (`temperature`, `top_k`, `top_p`; at T = 0 greedy) with the KV cache of a `max_new_tokens` run (attention
    reads the whole cache buffer, so its length matters: profile with the run's own). One prefill, then from
    its state (time of `hi` rounds − time of `lo` rounds) / (hi − lo) per bucket, in each of `repeats` passes
    that time a plain round, every bucket in turn, and a plain round again; one compilation for all. A hybrid
    drafter's rounds are timed with its model's forward and without (`model_variants`), interleaved.
    drafter: a `drafters.factory.Drafter`. Raises ValueError unless 1 <= lo < hi and repeats >= 1."""
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
    variants = model_variants(drafter)  # (rounds that run the model, [rounds that skip it])
    # one prefilled state for every variant: they differ only in when the model's forward runs, not in their state
    state = speculative_start(target.graphdef, target.state, drafter.graphdef, drafter.state, prompts, lens,
                              jax.random.key(0), params, threshold, pad_id=target.config.pad_token_id, **static)

    def seconds(variant: int, choice: int, rounds: int) -> float:
        d = variants[variant]
        t0 = time.perf_counter()
        jax.block_until_ready(speculative_rounds(target.graphdef, target.state, d.graphdef, d.state, state, params,
                                                 threshold, jnp.int32(choice), jnp.int32(rounds), **static))
        return time.perf_counter() - t0

    def per_round(choice: tuple[int, int]) -> float:
        return (seconds(*choice, hi) - seconds(*choice, lo)) / (hi - lo)

    # (variant, bucket index); -1: plain rounds (no proposal: the same for every variant)
    choices = [(v, i) for v in range(len(variants)) for i in range(len(buckets))]
    for c in [(0, -1)] + choices:  # warm-up: compiles once per variant, touches every branch
        seconds(*c, lo)
    plain, rounds = [], {c: [] for c in choices}
    for _ in range(repeats):
        first = per_round((0, -1))
        for c in choices:
            rounds[c].append(per_round(c))
        plain.append((first + per_round((0, -1))) / 2)
    return RoundTimings(batch, tuple(buckets), tuple(plain),
                        tuple(tuple(tuple(rounds[(v, i)]) for i in range(len(buckets))) for v in range(len(variants))))


def profile_round_costs(target: Target, drafter, batch: int, buckets: tuple[int, ...], *, prompt_len: int = 64,
                        max_new_tokens: int = 64, repeats: int = 5, lo: int = 1, hi: int = 5,
                        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> RoundCosts:
    """The `RoundCosts` of `time_rounds` (same arguments and errors; `RoundTimings.costs`); prints the tables."""
    costs = time_rounds(target, drafter, batch, buckets, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                        repeats=repeats, lo=lo, hi=hi, temperature=temperature, top_k=top_k, top_p=top_p).costs()
    plain = costs.plain
    print(f"  plain round: {plain * 1e3:.1f} ms", file=sys.stderr, flush=True)
    tables = [("", costs.seconds)] + ([(" (model skipped)", costs.lookup_seconds)] if costs.lookup_seconds else [])
    for kind, table in tables:
        for t, cost in zip(buckets, table):
            print(f"  round at bucket {t} ({t - batch} drafts){kind}: {cost * 1e3:.1f} ms ({cost / plain:.2f}x plain)",
                  file=sys.stderr, flush=True)
    return costs


def model_variants(drafter: Drafter) -> tuple[Drafter, ...]:
    """What a profile times: a hybrid drafter (`drafters.hybrid`) as two drafters — its model's forward run in
    every round (`skip_model_at` inf) and never (0) —, any other drafter as itself. The options that only steer
    choices (a hybrid's `skip_model_at`, `model_prior_strength`, `price_model`, a lookup's `calibrated`: none changes
    what a forced round computes) are set to one value, so drafters that differ only in them share a profile."""
    drafter = with_choice_defaults(drafter)
    if not is_hybrid(drafter):
        return (drafter,)
    return with_skip_model_at(drafter, float("inf")), with_skip_model_at(drafter, 0.0)


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
            lookup = data.get("lookup_seconds")
            return RoundCosts(int(data["batch"]), tuple(data["buckets"]), tuple(data["seconds"]), float(data["plain"]),
                              data["machine"], None if lookup is None else tuple(lookup))
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

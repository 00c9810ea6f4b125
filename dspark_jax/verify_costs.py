"""Measured cost of one speculative round at each verification width on this machine — the cost curve behind
the jitted loop's hardware-aware draft length (`decoding.draft_length`, DSpark §5: Θ = τ · SPS).

cost(w) = seconds of the target's verification forward over batch × w tokens (logits included) + seconds of
the drafter's proposal (paid whatever the width). Costs are profiled once per machine, target, drafter,
batch and attention implementation and cached as JSON under the user cache directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.decoding.autoregressive import prefill
from dspark_jax.decoding.draft_length import efficient_widths
from dspark_jax.decoding.verification import concat_taps
from dspark_jax.models.layout import dense_layout
from dspark_jax.sampling import FilterMode, SamplingParams
from dspark_jax.target import Target
from dspark_jax.utils.files import atomic_write_text, cache_dir
from dspark_jax.utils.machine import describe_machine
from dspark_jax.utils.timing import median_seconds

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class VerifyCosts:
    """seconds[i]: one round verifying widths[i] tokens per request at `batch` requests (proposal included)."""
    batch: int
    widths: tuple[int, ...]
    seconds: tuple[float, ...]
    machine: str = ""

    def efficient(self, max_widths: int = 5) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(widths, seconds) worth compiling into the loop (`draft_length.efficient_widths`)."""
        return efficient_widths(self.widths, self.seconds, max_widths)

    def relative(self) -> tuple[float, ...]:
        """Costs relative to the width-1 round (a plain step with the drafter's overhead)."""
        return tuple(s / self.seconds[0] for s in self.seconds)


def _profile_key(target: Target, drafter, batch: int, widths: tuple[int, ...], attn_impl: str) -> str:
    config = drafter.config
    raw = json.dumps([FORMAT_VERSION, describe_machine(), target.source, str(target.state_dtype), batch, list(widths),
                      attn_impl, drafter.source, repr(config)], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def profile_verify_costs(target: Target, drafter, batch: int, widths: tuple[int, ...], attn_impl: str = "reference",
                         repeats: int = 5, cache_len: int = 512, prompt_len: int = 64) -> VerifyCosts:
    """Times the verification forward at every width (median of `repeats` after a warm-up) and the drafter's
    proposal once, on a prompt of `prompt_len` tokens. drafter: a `drafters.factory.LoadedDrafter`."""
    model = nnx.merge(target.graphdef, target.state)
    d = nnx.merge(drafter.graphdef, drafter.state)
    taps = d.config.target_layer_ids
    vocab = target.config.vocab_size
    prompts = (jnp.arange(batch * prompt_len, dtype=jnp.int32).reshape(batch, prompt_len) * 7919 + 3) % vocab
    lens = jnp.full((batch,), prompt_len, jnp.int32)
    _, out = jax.jit(lambda p, n: prefill(model, p, n, cache_len, attn_impl, tap_layers=taps))(prompts, lens)
    start = lens

    @jax.jit
    def propose(drafter_state):
        params = SamplingParams.create(batch, 0.0, 0, 1.0)
        return d.propose(model, drafter_state, prompts[:, -1], start, jax.random.key(0), params, FilterMode(),
                         d.head_matrix(model), attn_impl)

    drafter_state = d.prefill(model, d.init_state(batch, cache_len), concat_taps(out.taps), prompts, lens)
    propose_s = median_seconds(lambda: propose(drafter_state), repeats)
    seconds = []
    for w in widths:
        @jax.jit
        def verify(cache, tokens, w=w):
            o = model.forward_flat(tokens, dense_layout(batch, w, start), cache, tap_layers=taps, attn_impl=attn_impl)
            return jnp.argmax(model.logits(o.hidden), axis=-1), o.cache
        tokens = prompts[:, :w].reshape(-1)
        seconds.append(median_seconds(lambda: verify(out.cache, tokens), repeats) + propose_s)
        print(f"  verify width {w}: {seconds[-1] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return VerifyCosts(batch, tuple(widths), tuple(seconds), describe_machine())


def load_or_profile_verify_costs(target: Target, drafter, batch: int, attn_impl: str = "reference",
                                 use_cache: bool = True) -> VerifyCosts:
    """The cost of every width 1..G+1 of `drafter` at `batch`, from the cache when this machine already
    profiled it, else profiled now (a few seconds per width on a CPU for the embedded target, mostly
    compilation) and cached. A cache file that cannot be read is profiled again and rewritten."""
    g = drafter.config.block_size
    widths = tuple(range(1, g + 2))
    path = cache_dir() / "verify_costs" / f"{_profile_key(target, drafter, batch, widths, attn_impl)}.json"
    if use_cache and path.is_file():
        try:
            data = json.loads(path.read_text())
            return VerifyCosts(int(data["batch"]), tuple(data["widths"]), tuple(data["seconds"]), data["machine"])
        except (ValueError, KeyError, TypeError):
            print(f"verify cost cache {path} is unreadable; profiling again", file=sys.stderr)
    print(f"profiling verification widths 1..{g + 1} at batch {batch} (once per machine) ...", file=sys.stderr)
    costs = profile_verify_costs(target, drafter, batch, widths, attn_impl)
    if use_cache:
        atomic_write_text(path, json.dumps(dataclasses.asdict(costs), indent=1))
    return costs

"""Rejection-sampling acceptance on Gemma-sized vocabularies: dense target probabilities (`token_probs`, the
[B·(G+1), V] softmax materialised) vs the lean path the decoders use (`lazy_token_probs`: per-row max,
normaliser and filter threshold; probabilities gathered only at the drafted tokens and the one row a request
draws its next token from). Same logits, keys and drafts for both, side by side in one run; the verdicts are
checked equal.

    python benchmarks/acceptance.py [--batch_size 8] [--gamma 7] [--vocab 262144] [--repeats 10]

Prints a table and writes benchmarks/results/acceptance.json.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.decoding.rejection import verify
from dspark_jax.sampling import FilterMode, SamplingParams, lazy_token_probs, token_probs
from dspark_jax.utils.machine import describe_machine
from dspark_jax.utils.results import write_result
from dspark_jax.utils.timing import median_seconds

SETTINGS = {  # name: (temperature, top_k, top_p)
    "greedy (T=0)": (0.0, 0, 1.0),
    "T=1": (1.0, 0, 1.0),
    "T=1, top-k 20": (1.0, 20, 1.0),
    "T=0.7, top-p 0.9": (0.7, 0, 0.9),
}


@functools.partial(jax.jit, static_argnames=("mode", "lazy"))
def acceptance(key, logits, draft_tokens, p_draft_x, p_draft, proposal_len, params, mode, lazy):
    """One round's acceptance for B requests: target probabilities from flat logits [B·(G+1), V], verdict."""
    b, g = draft_tokens.shape
    rows = SamplingParams(*(jnp.repeat(x, g + 1) for x in (params.temperature, params.top_k, params.top_p)))
    probs = (lazy_token_probs if lazy else token_probs)(logits, rows, mode)
    return verify(key, draft_tokens, p_draft_x, lambda k: p_draft[jnp.arange(b), k], probs, proposal_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--output", default="benchmarks/results/acceptance.json")
    args = ap.parse_args()
    b, g, v = args.batch_size, args.gamma, args.vocab
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 3, (b * (g + 1), v)), jnp.float32)
    draft_tokens = jnp.asarray(rng.integers(0, v, (b, g)), jnp.int32)
    p_draft = jax.nn.softmax(jnp.asarray(rng.normal(0, 3, (b, g, v)), jnp.float32), -1)
    p_draft_x = jnp.take_along_axis(p_draft, draft_tokens[..., None], -1)[..., 0]
    proposal_len = jnp.full((b,), g, jnp.int32)
    key = jax.random.key(0)
    rows = []
    print(f"machine: {describe_machine()}; B={b}, G+1={g + 1}, V={v}")
    print(f"{'setting':<20} {'dense ms':>9} {'lean ms':>9} {'ratio':>7}  verdicts equal")
    for name, (t, k, p) in SETTINGS.items():
        params = SamplingParams.create(b, t, k, p)
        mode = FilterMode.for_run(t, k, p)
        run = functools.partial(acceptance, key, logits, draft_tokens, p_draft_x, p_draft, proposal_len, params,
                                mode)
        dense, lean = run(lazy=False), run(lazy=True)
        same = bool(jnp.array_equal(dense.num_accepted, lean.num_accepted)
                    and jnp.array_equal(dense.next_token, lean.next_token))
        ms_dense = 1e3 * median_seconds(lambda: run(lazy=False), args.repeats)
        ms_lean = 1e3 * median_seconds(lambda: run(lazy=True), args.repeats)
        rows.append(dict(setting=name, temperature=t, top_k=k, top_p=p, dense_ms=ms_dense, lean_ms=ms_lean,
                         speedup=ms_dense / ms_lean, verdicts_equal=same))
        print(f"{name:<20} {ms_dense:>9.1f} {ms_lean:>9.1f} {ms_dense / ms_lean:>6.1f}x  {same}")
    write_result(args.output, dict(machine=describe_machine(), batch_size=b, gamma=g, vocab=v,
                                   repeats=args.repeats, results=rows))


if __name__ == "__main__":
    main()

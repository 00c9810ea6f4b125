"""What greedy decoding's argmax over the target's 262,144-token vocabulary costs on this machine: XLA's
`jnp.argmax`, the library's `sampling.fast_argmax` (what greedy sampling and verification use: a blocked argmax
with a NaN check) and three other rewrites, per number of rows (1: a plain step at batch 1; 8: at batch 8; 16: a
15-draft verification at batch 1), each checked equal to `jnp.argmax` (first index of the maximum) on random
logits, on logits with ties and on logits with NaN. XLA:CPU's argmax (a variadic reduction) costs ~1.2 ms a row.
"min-index" is the library's argmax up to session 54 (min over index + V · [x < max], with an exp-sum check);
"blocked" is `fast_argmax` without its NaN check (XLA:CPU's max over a block drops NaN, so a row with NaN
differs): the difference between the two is what the check costs.

    python benchmarks/argmax_cost.py [--vocab 262144 --rows 1,8,16 --repeats 100]

Prints a table (median ms per call over interleaved repeats) and writes JSON.
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--rows", default="1,8,16")
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--output", default="benchmarks/results/argmax_cost.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dspark_jax.sampling import fast_argmax
    from dspark_jax.sampling.exact_compare import blocked_argmax, gt_safe, gt_step
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result
    from dspark_jax.utils.timing import interleaved_seconds

    def two_pass(x):  # the maximum, then the first index holding it
        iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
        hit = (x == jnp.max(x, -1, keepdims=True)) | jnp.isnan(x)
        first_nan = jnp.min(jnp.where(jnp.isnan(x), iota, x.shape[-1]), -1)
        first_max = jnp.min(jnp.where(hit, iota, x.shape[-1]), -1)
        return jnp.where(first_nan < x.shape[-1], first_nan, first_max)

    def min_index(x):  # session 54's fast_argmax: min over (index + V · [x < max]), exp-sum check, else argmax
        v = x.shape[-1]
        m = jnp.max(x, axis=-1, keepdims=True)
        iota = jax.lax.broadcasted_iota(jnp.float32, x.shape, 1)
        fast = lambda x: jnp.min(iota + gt_step(m, x) * v, axis=-1).astype(jnp.int32)  # noqa: E731
        ok = jnp.isfinite(jnp.sum(jnp.exp(x - m), axis=-1)) & gt_safe(m[:, 0])
        return jax.lax.cond(jnp.all(ok), fast, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), x)

    fns = {"jnp.argmax": jax.jit(lambda x: jnp.argmax(x, -1).astype(jnp.int32)), "fast_argmax": fast_argmax,
           "min-index": jax.jit(min_index), "two-pass": jax.jit(two_pass),
           f"blocked ({args.block})": jax.jit(lambda x: blocked_argmax(x, args.block))}
    rows_list = [int(r) for r in args.rows.split(",")]
    results, exact = {}, {}
    for rows in rows_list:
        key = jax.random.key(rows)
        x = jax.random.normal(key, (rows, args.vocab), jnp.float32)
        ties = jnp.round(x * 2) / 2  # many equal maxima: the first must win
        nans = x.at[:, args.vocab // 3].set(jnp.nan).at[:, args.vocab - 1].set(jnp.nan)
        for name, f in fns.items():
            for case, a in (("random", x), ("ties", ties), ("NaN", nans)):
                exact[f"{name} rows={rows} {case}"] = bool((f(a) == fns["jnp.argmax"](a)).all())
        times = interleaved_seconds({name: (lambda f=f: f(x).block_until_ready()) for name, f in fns.items()},
                                    args.repeats)
        results[rows] = {name: float(np.median(t)) for name, t in times.items()}

    print(f"machine: {describe_machine()}; vocabulary {args.vocab}, median of {args.repeats} interleaved calls (ms)")
    print(f"{'rows':>5} " + " ".join(f"{n:>16}" for n in fns))
    for rows in rows_list:
        print(f"{rows:>5} " + " ".join(f"{results[rows][n] * 1e3:16.3f}" for n in fns))
    print("equal to jnp.argmax:", ", ".join(f"{k}: {v}" for k, v in exact.items() if "jnp.argmax" not in k))
    write_result(args.output, dict(machine=describe_machine(), **vars(args),
                                   median_seconds={str(r): v for r, v in results.items()}, exact=exact))


if __name__ == "__main__":
    main()

"""The output head (tied embedding, 262,144 × 640 for Gemma 3 270M) at each row count: XLA's einsum,
`models.output_head.tied_logits` (the fused multiply-and-sum loop for `FUSED_ROWS` on CPU, the einsum otherwise)
and the fused loop itself at every row count (`fused_logits`: where it would win), and the whole verification
forward (18 layers + head) at each width, on the embedded target.

    python benchmarks/lm_head.py [--rows 1,2,3,4,6,8,12,16] [--widths 1,2,4,8] [--repeats 15] [--table_rows N]

Rows = requests × verified tokens (a drafter's head: requests × block positions; `--table_rows 32768` times the
head on the first 32,768 rows of the table, the shape of a 32k draft vocabulary's head). Median of --repeats
jitted calls after warm-up; ratios are to one row in the same
run. The forward is timed with the model's own `logits` (so with `tied_logits`) and without the head, with a
512-row KV cache. Last, the layers' own products at each row count (`--matmul_rows`): 18 random 640 × 2048
matrices (the MLP's gate and up shape) as a matmul and as the head's broadcast-multiply-and-sum over either axis.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.utils.timing import median_seconds


def main():
    from dspark_jax.models.kv_cache import init_cache
    from dspark_jax.models.output_head import fused_logits, tied_logits, uses_fused_loop
    from dspark_jax.target import load_target
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,4,6,8,12,16")
    ap.add_argument("--widths", default="1,2,4,8")
    ap.add_argument("--matmul_rows", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--table_rows", type=int, default=0, help="time the head on the table's first N rows (0: all)")
    ap.add_argument("--output", default="benchmarks/results/lm_head.json")
    args = ap.parse_args()

    target = load_target(None)
    table = target.state["embed_tokens"][...]
    if args.table_rows:
        table = table[:args.table_rows]
    einsum = jax.jit(lambda h, t: jnp.einsum("...d,vd->...v", h, t, preferred_element_type=jnp.float32))
    fused = jax.jit(tied_logits)
    loop = jax.jit(fused_logits)
    print(f"machine: {describe_machine()}; table {tuple(table.shape)} {table.dtype}")
    print(f"{'rows':>4} {'einsum ms':>10} {'tied_logits ms':>15} {'path':>7} {'gain':>6} {'fused loop ms':>14}")
    head_rows = []
    for n in [int(r) for r in args.rows.split(",")]:
        h = jax.random.normal(jax.random.key(n), (n, table.shape[1]), jnp.float32)
        a = median_seconds(lambda: einsum(h, table), args.repeats)
        b = median_seconds(lambda: fused(h, table), args.repeats)
        c = median_seconds(lambda: loop(h, table), args.repeats)
        path = "fused" if uses_fused_loop(n) else "einsum"
        head_rows.append({"rows": n, "einsum_ms": a * 1e3, "tied_logits_ms": b * 1e3, "path": path,
                          "fused_loop_ms": c * 1e3})
        print(f"{n:>4} {a * 1e3:>10.1f} {b * 1e3:>15.1f} {path:>7} {a / b:>5.2f}x {c * 1e3:>14.1f}", flush=True)

    def forward_fn(head: bool):
        @jax.jit
        def forward(state, tokens, cache):
            model = nnx.merge(target.graphdef, state)
            start = jnp.full((tokens.shape[0],), 100, jnp.int32)
            out = model(tokens, start[:, None] + jnp.arange(tokens.shape[1])[None], cache, start)
            return model.logits(out.hidden) if head else out.hidden
        return forward

    with_head, layers_only = forward_fn(True), forward_fn(False)
    cache = init_cache(target.config, 1, 512, jnp.float32)
    print(f"\n{'width':>5} {'forward ms':>11} {'x width 1':>10} {'layers only ms':>15} {'x width 1':>10}")
    fwd_rows = []
    for w in [int(x) for x in args.widths.split(",")]:
        tokens = jnp.full((1, w), 7, jnp.int32)
        s = median_seconds(lambda: with_head(target.state, tokens, cache), args.repeats)
        s_layers = median_seconds(lambda: layers_only(target.state, tokens, cache), args.repeats)
        fwd_rows.append({"width": w, "forward_ms": s * 1e3, "layers_ms": s_layers * 1e3})
        print(f"{w:>5} {s * 1e3:>11.1f} {s / (fwd_rows[0]['forward_ms'] / 1e3):>9.2f}x {s_layers * 1e3:>15.1f} "
              f"{s_layers / (fwd_rows[0]['layers_ms'] / 1e3):>9.2f}x", flush=True)

    weights = [jax.random.normal(jax.random.key(i), (640, 2048), jnp.float32) for i in range(18)]
    transposed = [w.T.copy() for w in weights]
    products = {"matmul": (jax.jit(lambda x, ws: [x @ w for w in ws]), weights),
                "sum over major axis": (jax.jit(lambda x, ws: [(x[:, :, None] * w[None]).sum(1) for w in ws]),
                                        weights),
                "sum over minor axis": (jax.jit(lambda x, ws: [(x[:, None, :] * w[None]).sum(2) for w in ws]),
                                        transposed)}
    print(f"\n{'rows':>4} " + " ".join(f"{k + ' ms':>22}" for k in products) + "   (18 products 640 x 2048)")
    mm_rows = []
    for n in [int(r) for r in args.matmul_rows.split(",")]:
        x = jax.random.normal(jax.random.key(100 + n), (n, 640), jnp.float32)
        row = {"rows": n}
        for name, (fn, ws) in products.items():
            row[name + " ms"] = median_seconds(lambda: fn(x, ws), args.repeats) * 1e3
        mm_rows.append(row)
        print(f"{n:>4} " + " ".join(f"{row[k + ' ms']:>22.1f}" for k in products), flush=True)
    write_result(args.output, {"machine": describe_machine(), "backend": jax.default_backend(),
                               "table_shape": list(table.shape), "head": head_rows, "forward": fwd_rows,
                               "layer_products": mm_rows})


if __name__ == "__main__":
    main()

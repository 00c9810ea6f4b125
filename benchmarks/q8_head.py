"""The output head computed from the GGUF's own Q8_0 blocks instead of the dequantized float32 table: what it
would cost and whether it is exact (a measurement for a change not made yet; the model runs `tied_logits`).

The embedded Gemma 3 270M stores its tied embedding (262,144 × 640) as Q8_0: blocks of 32 int8 values q with one
float16 scale d, value = d · q. The loader dequantizes it into a 671 MB float32 table, and the head streams that
table once per call: at one row (plain decoding at batch 1) it is memory-bound, ~26 ms of a ~43 ms step on a
2-core CPU. The same numbers are 168 MB of int8 plus 21 MB of scales. This script reads the blocks from the GGUF,
checks that d · q reproduces the loader's table bit for bit (the product of an 11-bit and an 8-bit significand is
exact in float32), and times, per row count, against `tied_logits` on the float32 table:

"q8 gemv": one `[1, d] @ dequant(q, d)ᵀ` per row — XLA:CPU fuses the dequantization into its own vectorized
matrix-vector loop (only a matrix-vector dot takes fused producers there), so the table is streamed as int8, once
per row. (Tried in a scratch script and dropped: one broadcast-multiply-and-sum loop over all rows with the
dequantization inside, in the [V, 640] layout or transposed to [640, V], and a dot of the dequantized table at
several rows: 0.2–2.4 s, the loop is not vectorized or the table is materialized in float32. With the blocks
closed over as constants instead of passed as arguments XLA folds the dequantization at compile time and times
a float32 table: a trap for anyone timing this.) It reports the largest logit difference and whether every row's argmax agrees, on the target's real final-normed
hidden states of a held-out prompt.

    python benchmarks/q8_head.py [--rows 1,2,3,4,8 --repeats 10]

Writes JSON.
"""
from __future__ import annotations

import argparse

import numpy as np

BLOCK = 32  # Q8_0: values per block (ggml's QK8_0)


def q8_blocks(gguf, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [V, D], d float32 [V, D / 32]) of a Q8_0 tensor of shape [V, D] (numpy layout): each block is a
    float16 scale followed by 32 int8 values."""
    from gguf import GGMLQuantizationType
    info = gguf.tensors[name]
    if GGMLQuantizationType(info.qtype) != GGMLQuantizationType.Q8_0:
        raise SystemExit(f"{name} is {GGMLQuantizationType(info.qtype).name}, not Q8_0: nothing to measure")
    rows, cols = info.shape
    raw = np.asarray(gguf._mmap[info.offset:info.offset + info.nbytes]).reshape(rows, cols // BLOCK, 2 + BLOCK)
    d = np.ascontiguousarray(raw[:, :, :2]).view(np.float16)[..., 0].astype(np.float32)
    q = np.ascontiguousarray(raw[:, :, 2:]).view(np.int8).reshape(rows, cols)
    return q, d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,4,8")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--output", default="benchmarks/results/q8_head.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.decoding.autoregressive import prefill
    from dspark_jax.io.gguf_file import GGUFFile
    from dspark_jax.models.output_head import tied_logits
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result
    from dspark_jax.utils.timing import median_seconds

    target = load_target()
    table = target.model.embed_tokens[...]
    q_np, d_np = q8_blocks(GGUFFile(target.source), "token_embd.weight")
    v, dim = q_np.shape
    exact = bool(np.array_equal((q_np.reshape(v, -1, BLOCK) * d_np[:, :, None]).reshape(v, dim), np.asarray(table)))
    print(f"machine: {describe_machine()}; table {v} x {dim}: float32 {table.nbytes / 2**20:.0f} MiB, int8 + scales "
          f"{(q_np.nbytes + d_np.nbytes) / 2**20:.0f} MiB; d * q equals the loader's float32 table: {exact}")
    q, d = jnp.asarray(q_np), jnp.asarray(d_np)
    del q_np, d_np

    def dequant(q, d):  # [V, D]
        return (q.astype(jnp.float32).reshape(v, -1, BLOCK) * d[:, :, None]).reshape(v, dim)

    @jax.jit
    def q8_gemv(h, q, d):
        return jnp.concatenate([h[r:r + 1] @ dequant(q, d).T for r in range(h.shape[0])])

    f32_head = jax.jit(tied_logits)
    max_rows = max(int(r) for r in args.rows.split(","))
    prompt = format_prompt(read_first_turns(eval_dataset_path("mbpp"))[0])
    ids = target.tokenizer.encode(prompt, add_bos=True)
    width = max(len(ids), max_rows)
    tokens = jnp.asarray([ids + [0] * (width - len(ids))], jnp.int32)
    _, out = prefill(target.model, tokens, jnp.asarray([len(ids)], jnp.int32), width)
    hidden = out.hidden[0, len(ids) - max_rows:len(ids)]  # the prompt's last rows, final-normed

    rows_out = []
    print(f"{'rows':>4} {'f32 tied_logits ms':>19} {'q8 gemv ms':>11} {'ratio':>6}   max |logit diff|, argmax same")
    for r in [int(x) for x in args.rows.split(",")]:
        h = hidden[:r]
        ref = f32_head(h, table)
        out = q8_gemv(h, q, d)
        row = dict(rows=r, f32_ms=median_seconds(lambda: f32_head(h, table), args.repeats) * 1e3,
                   q8_gemv_ms=median_seconds(lambda: q8_gemv(h, q, d), args.repeats) * 1e3,
                   max_abs_diff=float(jnp.abs(out - ref).max()),
                   argmax_same=bool((out.argmax(-1) == ref.argmax(-1)).all()))
        rows_out.append(row)
        print(f"{r:>4} {row['f32_ms']:19.1f} {row['q8_gemv_ms']:11.1f} {row['q8_gemv_ms'] / row['f32_ms']:6.2f}   "
              f"{row['max_abs_diff']:.1e}, {row['argmax_same']}", flush=True)
    write_result(args.output, dict(machine=describe_machine(), table_shape=[v, dim], q8_exact=exact, **vars(args),
                                   timings=rows_out))



if __name__ == "__main__":
    main()

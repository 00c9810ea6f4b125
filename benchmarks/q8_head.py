"""The output head read from the GGUF's Q8_0 blocks (`load_target`'s q8_head and q8_kernel,
`models.output_head.q8_logits`, `models.q8_ffi`) against the dequantized float32 table: the head alone by row count,
then plain decoding and the main job at batch 1 with each, side by side in one run.

The embedded Gemma 3 270M stores its tied embedding (262,144 × 640) as Q8_0: blocks of 32 int8 values with one
float16 scale, value = scale · q, exact in float32. The float32 table is 640 MiB and the head streams all of it at
every call; the blocks are 180 MiB. Part 1 times `tied_logits` on the table against `q8_logits` on the blocks (one
XLA matrix-vector loop per row, and the `q8_ffi` kernel) at each row count, on the target's own final-normed hidden
states of a held-out prompt, with the largest logit difference and whether every row's argmax agrees. Part 2
decodes the first --limit held-out prompts of each set at batch 1 with each --heads target (f32: the float32
table and layers; q8-gemv: the Q8_0 head through XLA's matrix-vector loops at 1–3 rows (session 49's default);
q8-kernel: the Q8_0 head through the `q8_ffi` kernel at 2–64 rows; int8: that head and the layers' projections
from the GGUF's int8 blocks, `models.int8_linear` — the default since session 50):
plain decoding and the main job (`default+ngram`, γ 15, draft length auto), every run once per repeat in turn,
each keeping its fastest; every output is compared with the first head's plain decoding ("over ref plain").

    python benchmarks/q8_head.py [--rows 1,2,3,4,8 --heads q8-gemv,int8
                                  --datasets gsm8k,humaneval,mbpp,mt-bench --limit 8 --max_new_tokens 96
                                  --repeats 2]          # --datasets '' skips part 2

Writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,4,5,6,8,12,16,24,32")
    ap.add_argument("--heads", default="q8-gemv,int8", help="the targets part 2 compares (module doc)")
    ap.add_argument("--head_repeats", type=int, default=10)
    ap.add_argument("--datasets", default="gsm8k,humaneval,mbpp,mt-bench")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--drafter", default="default+ngram")
    ap.add_argument("--gamma", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--output", default="benchmarks/results/q8_head.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.decoding.autoregressive import prefill
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.generation import (GenerationConfig, generate_text, pooled_accept_length,
                                      release_compiled_programs, throughput)
    from dspark_jax.models.output_head import q8_logits, tied_logits
    from dspark_jax.models.q8_ffi import kernel_available, kernel_blocker
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result
    from dspark_jax.utils.timing import median_seconds

    loaders = {"f32": lambda: load_target(q8_head=False, int8_layers=False),
               "q8-gemv": lambda: load_target(q8_head=True, q8_kernel=False, int8_layers=False),
               "q8-kernel": lambda: load_target(q8_head=True, q8_kernel=True, int8_layers=False),
               "int8": lambda: load_target(q8_head=True, q8_kernel=True, int8_layers=True)}
    heads = args.heads.split(",")
    if unknown := set(heads) - set(loaders):
        raise SystemExit(f"--heads: unknown {sorted(unknown)}; choose from {sorted(loaders)}")
    targets = {k: loaders[k]() for k in dict.fromkeys(["f32", *heads])}  # f32: part 1's reference
    model = load_target(q8_head=True, q8_kernel=False).model if "q8-gemv" not in targets else targets["q8-gemv"].model
    table, values, scales = model.embed_tokens[...], model.head_q8_values[...], model.head_q8_scales[...]
    print(f"machine: {describe_machine()}; table {table.shape[0]} x {table.shape[1]}: float32 "
          f"{table.nbytes / 2**20:.0f} MiB, Q8_0 blocks {(values.nbytes + scales.nbytes) / 2**20:.0f} MiB")

    # part 1: the head alone
    max_rows = max(int(r) for r in args.rows.split(","))
    ids = targets["f32"].tokenizer.encode(format_prompt(read_first_turns(eval_dataset_path("mbpp"))[0]),
                                          add_bos=True)
    width = max(len(ids), max_rows)
    tokens = jnp.asarray([ids + [0] * (width - len(ids))], jnp.int32)
    _, out = prefill(targets["f32"].model, tokens, jnp.asarray([len(ids)], jnp.int32), width)
    hidden = out.hidden[0, max(0, len(ids) - max_rows):][:max_rows]  # the prompt's last rows, final-normed
    hidden = jnp.concatenate([hidden] * -(-max_rows // hidden.shape[0]))[:max_rows]
    kernel = kernel_available()
    forms = {"f32": (jax.jit(tied_logits), (table,)), "gemv": (jax.jit(q8_logits), (values, scales))}
    if kernel:
        forms["kernel"] = (jax.jit(functools.partial(q8_logits, kernel=True)), (values, scales))
    else:
        print(f"no q8_ffi kernel here: {kernel_blocker()}")
    head_rows = []
    print(f"{'rows':>4} " + " ".join(f"{k + ' ms':>10}" for k in forms) + "   max |logit diff| / argmax same vs f32")
    for r in [int(x) for x in args.rows.split(",")]:
        h = hidden[:r]
        ref = forms["f32"][0](h, table)
        row, notes = dict(rows=r), []
        for name, (f, operands) in forms.items():
            if name == "gemv" and r > 8:
                continue  # one pass per row: linear in the rows
            got = f(h, *operands)
            row[f"{name}_ms"] = median_seconds(lambda: f(h, *operands), args.head_repeats) * 1e3
            if name != "f32":
                row[f"{name}_max_abs_diff"] = float(jnp.abs(got - ref).max())
                row[f"{name}_argmax_same"] = bool((got.argmax(-1) == ref.argmax(-1)).all())
                notes.append(f"{name} {row[f'{name}_max_abs_diff']:.1e} / {row[f'{name}_argmax_same']}")
        head_rows.append(row)
        print(f"{r:>4} " + " ".join(f"{row[k + '_ms']:10.1f}" if k + "_ms" in row else f"{'-':>10}" for k in forms)
              + "   " + ", ".join(notes), flush=True)
    result = dict(machine=describe_machine(), **vars(args), head=head_rows, decoding=[])
    write_result(args.output, result)

    # part 2: plain decoding and the main job with each target, batch 1, interleaved
    drafters = {k: with_block_size(load_drafter(args.drafter, t, gamma=args.gamma), args.gamma)
                for k, t in targets.items()}
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=1)
    names = [n for n in args.datasets.split(",") if n]
    if names:
        print(f"\n{'dataset':<10} {'decoding':<24} {'tokens/s':>9} {'tau':>6} {'over ref plain':>15} "
              f"{'over own plain':>15} {'same tokens':>12}")
    for name in names:
        prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path(name))[:args.limit]]

        def run(kind: str, drafted: bool, prompts=prompts):
            def go():
                res = generate_text(targets[kind], prompts, dataclasses.replace(
                    cfg, draft_length="auto" if drafted else "fixed"), drafter=drafters[kind] if drafted else None)
                return throughput(res, 1), res
            return go

        runs = {f"{kind} {'main job' if drafted else 'plain'}": run(kind, drafted)
                for drafted in (False, True) for kind in heads}
        best: dict = {}
        for _ in range(args.repeats):
            for label, go in runs.items():
                speed, res = go()
                if label not in best or speed > best[label][0]:
                    best[label] = (speed, res)
        release_compiled_programs()
        base = best[f"{heads[0]} plain"]
        for label, (speed, res) in best.items():
            kind, what = label.split(" ", 1)
            own = best[f"{kind} plain"][0]
            same = all(a.completion_ids == b.completion_ids for a, b in zip(res, base[1]))
            tau = pooled_accept_length(res) if what == "main job" else None
            result["decoding"].append(dict(dataset=name, decoding=label, tokens_per_s=speed, tau=tau,
                                           over_ref_plain=speed / base[0], over_own_plain=speed / own,
                                           same_tokens_as_ref_plain=same))
            print(f"{name:<10} {label:<24} {speed:9.1f} {'-' if tau is None else f'{tau:.2f}':>6} "
                  f"{speed / base[0]:15.2f} {speed / own:15.2f} {str(same):>12}", flush=True)
        write_result(args.output, result)  # after every set: an interrupted run keeps its rows


if __name__ == "__main__":
    main()

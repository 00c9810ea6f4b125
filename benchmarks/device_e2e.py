"""End-to-end speculative decoding on an accelerator that cannot receive the target's weights.

    python benchmarks/device_e2e.py --prepare benchmarks/device_inputs      # here, with the GGUF: config + prompt ids
    python benchmarks/device_e2e.py --inputs benchmarks/device_inputs --output $OUT/device_e2e.json   # on the GPU

The device machine gets the working tree only (64 MiB; the GGUF is 253 MB), so the target there is the embedded
Gemma 3 270M's exact architecture (`TransformerConfig` written by `--prepare`) with random weights; the drafter is
the shipped one (real weights, conditioned on the random target's features) in a hybrid with prompt lookup
(`default+ngram`, the shipped drafter's block: every round verifies block + 1 rows; session 30's recorded run
used the 7-token drafter shipped before that session's 15-token one). What this measures does not depend on the weights:
(1) losslessness on the device — in float32 every speculative run's greedy tokens must equal plain greedy
decoding's, with the reference attention and with the Pallas kernels (`attn_impl` pallas: Triton on GPU);
in bfloat16 a random-weight model's logits are near-ties (262,144 near-uniform logits), so a different
reduction order (T tokens verified at once, another kernel) flips argmaxes and equality is not expected;
(2) the cost of plain and speculative rounds (tokens/s, rounds/s = loop iterations/s) per attention
implementation. τ is a property of this random run only (a random target's greedy output repeats itself,
which lookup drafts).

Prompts: up to `--max_prompts` held-out prompts (`--per_set` per evaluation set) in the training format,
tokenized by the real tokenizer at `--prepare`, all of `--bucket`/2+1..`--bucket` tokens so each case compiles
one program (mbpp's prompts are all shorter than 65 tokens: none with the default bucket). Cases run in order
until `--budget_s` is spent; each case's compile time is reported and excluded from its tokens/s. Writes JSON
after every case.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
import traceback
from pathlib import Path

SETS = ("gsm8k", "humaneval", "mbpp", "mt-bench")


class PreparedTokenizer:
    """Maps each prepared prompt text to the ids the real tokenizer gave it; decodes to ''."""

    def __init__(self, ids_of: dict[str, list[int]], stop_ids: tuple[int, ...]):
        self.ids_of, self.stop_ids = ids_of, stop_ids

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return list(self.ids_of[text])

    def decode(self, ids) -> str:
        return ""


def prepare(out_dir: Path, per_set: int, bucket: int, max_prompts: int) -> None:
    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.generation import bucket_length
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt

    target = load_target()
    prompts = {}
    for name in SETS:
        kept = 0
        for text in read_first_turns(eval_dataset_path(name)):
            ids = target.tokenizer.encode(format_prompt(text), add_bos=True)
            # one prompt bucket: one compiled program per case
            if kept < per_set and len(prompts) < max_prompts and bucket_length(len(ids)) == bucket:
                prompts[format_prompt(text)], kept = ids, kept + 1
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(target.config), indent=1))
    (out_dir / "prompts.json").write_text(json.dumps(dict(stop_ids=list(target.stop_ids), prompts=prompts)))
    print(f"wrote {out_dir}/config.json ({target.config.name}, fingerprint {target.config.fingerprint()}) and "
          f"{len(prompts)} prompts of {bucket // 2 + 1}-{bucket} tokens")


def random_target(inputs: Path, dtype):
    from flax import nnx

    from dspark_jax.models.config import TransformerConfig
    from dspark_jax.models.transformer import Transformer
    from dspark_jax.target import Target

    raw = json.loads((inputs / "config.json").read_text())
    cfg = TransformerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    saved = json.loads((inputs / "prompts.json").read_text())
    graphdef, state = nnx.split(Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    tokenizer = PreparedTokenizer(saved["prompts"], tuple(saved["stop_ids"]))
    return Target(cfg, graphdef, state, tokenizer, "random weights"), list(saved["prompts"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", default=None, help="write config.json + prompts.json here (needs the GGUF)")
    ap.add_argument("--per_set", type=int, default=3, help="--prepare: prompts per evaluation set at most")
    ap.add_argument("--max_prompts", type=int, default=8, help="--prepare: prompts in all")
    ap.add_argument("--bucket", type=int, default=128, help="--prepare: keep prompts of bucket/2+1..bucket tokens")
    ap.add_argument("--inputs", default="benchmarks/device_inputs")
    ap.add_argument("--output", default="benchmarks/results/device_e2e.json")
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--budget_s", type=float, default=240.0, help="start no case after this many seconds")
    ap.add_argument("--impls", default="reference,pallas",
                    help="attention implementations; 'pallas:untuned' = the kernels with GpuConfig() tiles")
    ap.add_argument("--tiles", default=None, help="a tile table (gpu_kernels.py --tiles_output) for 'pallas', "
                    "over gpu_attention.TUNED as committed")
    ap.add_argument("--groups", default="float32:1,bfloat16:1,bfloat16:8",
                    help="dtype:batch groups, in order; each runs plain then the hybrid drafter per attention impl")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(Path(args.prepare), args.per_set, args.bucket, args.max_prompts)
        return

    import jax
    import jax.numpy as jnp

    from dspark_jax.drafters.factory import load_drafter
    from dspark_jax.generation import (GenerationConfig, generate_text, pooled_accept_length,
                                       release_compiled_programs, throughput)
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    from pallas_kernels import gpu_attention

    t_start = time.perf_counter()
    impls = args.impls.split(",")
    tuned = dict(gpu_attention.TUNED)
    if args.tiles and Path(args.tiles).is_file():
        tuned.update(gpu_attention.table_from_sweep(json.loads(Path(args.tiles).read_text())))
    elif args.tiles:
        print(f"no tile table at {args.tiles}: 'pallas' runs the committed gpu_attention.TUNED", flush=True)
    print(f"tiles for 'pallas': {len(tuned)} tuned shapes, GpuConfig() elsewhere", flush=True)
    # (dtype, impl, drafter, batch), the first implementation's plain run first in each (dtype, batch) group:
    # float32 at batch 1 checks losslessness per implementation, bfloat16 times
    groups = [(g.split(":")[0], int(g.split(":")[1])) for g in args.groups.split(",")]
    cases = [(dt, i, d, b) for dt, b in groups for d in ("none", "default+ngram") for i in impls]
    result = dict(machine=describe_machine(), jax_version=jax.__version__, **vars(args), rows=[])
    targets, plain_ids = {}, {}
    print(f"{'dtype':9s} {'attn':9s} {'drafter':14s} {'B':>2s} {'compile s':>9s} {'tokens/s':>9s} {'rounds/s':>9s} "
          f"{'tau':>5s} {'x plain':>7s} {'= plain':>8s}", flush=True)
    for dtype_name, impl, spec, bs in cases:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"time budget of {args.budget_s:.0f} s spent: skipping the remaining cases", flush=True)
            break
        row = dict(dtype=dtype_name, attn_impl=impl, drafter=spec, batch_size=bs)
        try:
            if dtype_name not in targets:
                targets[dtype_name] = random_target(Path(args.inputs), jnp.dtype(dtype_name))
            target, prompts = targets[dtype_name]
            drafter = load_drafter(spec, target)
            # the tiles are read when a program is traced: drop compiled programs so each case traces its own
            release_compiled_programs()
            gpu_attention.set_tuned({} if impl == "pallas:untuned" else tuned)
            cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=bs, attn_impl=impl.split(":")[0])
            t0 = time.perf_counter()
            generate_text(target, prompts[:bs], cfg, drafter=drafter)  # compile (+ one batch)
            row["compile_and_first_batch_s"] = time.perf_counter() - t0  # every prompt has one bucket
            res = generate_text(target, prompts, cfg, drafter=drafter)
            ids = [r.completion_ids for r in res]
            tps = throughput(res, bs)
            steps = [max((r.rounds if drafter else r.new_tokens) or 0 for r in res[i:i + bs])
                     for i in range(0, len(res), bs)]  # loop iterations of each batch
            row.update(tokens_per_s=tps, rounds_per_s=sum(steps) / sum(r.seconds for r in res[::bs]),
                       accept_len=pooled_accept_length(res) if drafter else None)
            key = (dtype_name, bs)
            if spec == "none" and impl == impls[0]:
                plain_ids[key] = (ids, tps)
            if key in plain_ids:
                ref_ids, ref_tps = plain_ids[key]
                row["speedup"] = tps / ref_tps
                row["identical_to_plain"] = ids == ref_ids
                row["first_divergence"] = next(([i, next(j for j, (a, b) in enumerate(zip(x + [-1], y + [-2]))
                                                         if a != b)] for i, (x, y) in enumerate(zip(ids, ref_ids))
                                                if x != y), None)
        except Exception as e:  # record and go on: one failing kernel must not hide the other cases
            row["error"] = "".join(traceback.format_exception_only(e)).strip()[-600:]
        result["rows"].append(row)
        write_result(args.output, dict(result, seconds=time.perf_counter() - t_start))
        if "error" in row:
            print(f"{dtype_name:9s} {impl:9s} {spec:14s} {bs:2d} ERROR {row['error'][:300]}", flush=True)
            continue
        tau = f"{row['accept_len']:5.2f}" if row["accept_len"] else "    -"
        same = {True: "yes", False: "NO", None: "-"}[row.get("identical_to_plain")]
        print(f"{dtype_name:9s} {impl:9s} {spec:14s} {bs:2d} {row['compile_and_first_batch_s']:9.1f} "
              f"{row['tokens_per_s']:9.1f} {row['rounds_per_s']:9.1f} {tau} {row.get('speedup', float('nan')):7.2f} "
              f"{same:>8s}", flush=True)


if __name__ == "__main__":
    main()

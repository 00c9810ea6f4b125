"""Greedy tokens/s of our jitted autoregressive loop vs HF transformers, same model, prompts, machine, run.

    python benchmarks/ar_vs_hf.py [--max_new_tokens 64] [--batch_sizes 1,8] [--output benchmarks/results/ar_vs_hf.json]

Both generate exactly `max_new_tokens` greedy tokens per prompt (stop tokens disabled) from the embedded
Gemma 3 270M in float32; compilation / warm-up runs are excluded from the timings. HF runs batches with
left padding and an attention mask, as its docs prescribe.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def time_ours(target, prompt_ids, max_new, repeats):
    from dspark_jax.decoding.autoregressive import generate
    from dspark_jax.sampling import SamplingParams
    from dspark_jax.generation import pad_batch
    tokens, lens = pad_batch(prompt_ids, target.config.pad_token_id, len(prompt_ids))
    args = (target.graphdef, target.state, jnp.asarray(tokens), jnp.asarray(lens), jax.random.key(0),
            SamplingParams.create(len(prompt_ids)))
    kw = dict(max_new_tokens=max_new, stop_ids=())
    jax.block_until_ready(generate(*args, **kw))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(generate(*args, **kw))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), np.asarray(out.tokens)


def time_hf(model, prompt_ids, max_new, repeats, pad_id):
    import torch
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
              pad_token_id=pad_id)
    with torch.no_grad():
        model.generate(ids, **kw)  # warm up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out[:, width:].numpy()


def main():
    from dspark_jax.utils.results import write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--batch_sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default="benchmarks/results/ar_vs_hf.json")
    args = ap.parse_args()

    import torch
    import transformers

    from dspark_jax.cli.common import read_prompts_file
    from dspark_jax.data import eval_dataset_path
    from dspark_jax.target import load_target
    from dspark_jax.utils.machine import describe_machine

    target = load_target(None, dtype=jnp.float32)
    path = Path(target.source)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    prompts = read_prompts_file(str(eval_dataset_path("mt-bench")))
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        ids = [target.tokenizer.encode(p)[:64] for p in prompts[:bs]]
        ours_s, ours_tok = time_ours(target, ids, args.max_new_tokens, args.repeats)
        hf_s, hf_tok = time_hf(hf, ids, args.max_new_tokens, args.repeats, target.config.pad_token_id)
        n = bs * args.max_new_tokens
        agree = float(np.mean([(a == b).all() for a, b in zip(ours_tok, hf_tok)]))
        rows.append(dict(batch_size=bs, new_tokens=n, ours_tokens_per_s=n / ours_s, hf_tokens_per_s=n / hf_s,
                         ratio=hf_s / ours_s, identical_sequences=agree))
        print(f"batch {bs}: ours {n / ours_s:8.1f} tok/s | HF {n / hf_s:8.1f} tok/s | ratio ours/HF "
              f"{hf_s / ours_s:5.2f}x | identical greedy sequences {agree:.0%}", flush=True)
    result = dict(machine=describe_machine(), torch_threads=torch.get_num_threads(),
                  jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__,
                  model=target.config.name, dtype="float32", max_new_tokens=args.max_new_tokens, rows=rows)
    write_result(args.output, result)


if __name__ == "__main__":
    main()

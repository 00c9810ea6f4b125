"""Plain autoregressive vs speculative decoding side by side: same prompts, seeds and machine, one run.

    python benchmarks/spec_vs_ar.py --drafters random:dspark,random:dflash,random:eagle3 \
        [--dataset mt-bench --limit 8 --max_new_tokens 64 --gamma 7 --temperature 0 --batch_size 1]

A drafter is `random:<algorithm>` (randomly initialised: correct output, acceptance near zero), `default`
(the shipped drafter) or a drafter directory, optionally `@N` to propose N tokens per round (N <= its
trained block size). `--dataset` takes a comma list (`--limit` applies to each);
prompts are wrapped in the training format unless `--raw_prompts`. Prints tokens/s, pooled accept length τ (committed tokens / verification rounds,
bonus included) and the speed ratio over plain decoding, and writes JSON. Compilation is excluded.
"""
from __future__ import annotations

import argparse


def main():
    from dspark_jax.utils.results import write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafters", default="random:dspark")
    ap.add_argument("--target", default=None)
    ap.add_argument("--dataset", default="mt-bench")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--draft_vocab_size", type=int, default=32768)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--confidence_threshold", type=float, default=0.0)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--raw_prompts", action="store_true",
                    help="use the prompts as they are instead of the training format 'Question: ...\\n\\nAnswer:'")
    ap.add_argument("--output", default="benchmarks/results/spec_vs_ar.json")
    args = ap.parse_args()

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.generation import GenerationConfig, generate_text, pooled_accept_length
    from dspark_jax.generation import throughput as throughput_of
    from dspark_jax.target import load_target
    from dspark_jax.utils.machine import describe_machine

    target = load_target(args.target)
    from dspark_jax.training.responses import format_prompt
    prompts = []
    for name in args.dataset.split(","):
        rows = read_first_turns(eval_dataset_path(name))[:args.limit]
        prompts += rows if args.raw_prompts else [format_prompt(p) for p in rows]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           batch_size=args.batch_size, seed=0)


    def throughput(results):
        return throughput_of(results, cfg.batch_size)

    plain = generate_text(target, prompts, cfg)
    base = throughput(plain)
    rows = [dict(decoding="plain", tokens_per_s=base, accept_len=None, speedup=1.0)]
    print(f"{'decoding':<24} {'tokens/s':>9} {'tau':>6} {'speed-up':>9}")
    print(f"{'plain':<24} {base:9.1f} {'-':>6} {1.0:9.2f}")
    for spec in args.drafters.split(","):
        kind, _, algorithm = spec.partition(":")
        kind, _, gamma = kind.partition("@")  # PATH@3: a trained drafter proposing 3 tokens per round
        drafter = load_drafter(kind, target, algorithm=algorithm or "dspark", gamma=args.gamma,
                               draft_vocab_size=args.draft_vocab_size or None)
        if gamma:
            drafter = with_block_size(drafter, int(gamma))
        res = generate_text(target, prompts, cfg, drafter=drafter, confidence_threshold=args.confidence_threshold)
        tps, tau = throughput(res), pooled_accept_length(res)
        same = all(a.completion_ids == b.completion_ids for a, b in zip(plain, res))
        rows.append(dict(decoding=spec, tokens_per_s=tps, accept_len=tau, speedup=tps / base,
                         identical_to_plain=same if args.temperature == 0 else None))
        print(f"{spec:<24} {tps:9.1f} {tau:6.2f} {tps / base:9.2f}")
    result = dict(machine=describe_machine(), model=target.config.name, **vars(args), rows=rows)
    write_result(args.output, result)


if __name__ == "__main__":
    main()

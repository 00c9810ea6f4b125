"""What a drafter adds to the loop's plain rounds: `--rounds` forced plain rounds of the speculative loop
(`speculative_rounds`, choice < 0: the target's step plus the drafter's commit and the round's bookkeeping) per
drafter, against plain decoding's `--rounds` steps (a (rounds + 1)-token `generate` less a 1-token one), on one
held-out prompt at batch 1, interleaved in `--repeats` repeats.

    python benchmarks/plain_rounds.py [--dataset mbpp --drafters ngram,default+ngram,default --rounds 95
                                       --repeats 5 --output benchmarks/results/plain_rounds.json]

Prints each drafter's best and median per round; writes JSON.
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mbpp")
    ap.add_argument("--drafters", default="ngram,default+ngram,default")
    ap.add_argument("--rounds", type=int, default=95)
    ap.add_argument("--gamma", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", default="benchmarks/results/plain_rounds.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.decoding.autoregressive import generate
    from dspark_jax.decoding.speculative import speculative_rounds, speculative_start
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.generation import encode_prompts, pad_batch
    from dspark_jax.sampling import SamplingParams
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result
    from dspark_jax.utils.timing import interleaved_seconds

    target = load_target()
    new = args.rounds + 1
    prompt = format_prompt(read_first_turns(eval_dataset_path(args.dataset))[0])
    tokens, lens = pad_batch(encode_prompts(target, [prompt], new), target.config.pad_token_id, 1)
    prompts, prompt_lens, keys = jnp.asarray(tokens), jnp.asarray(lens), jax.random.split(jax.random.key(0), 1)
    params, threshold = SamplingParams.create(1, 0.0, 0, 1.0), jnp.float32(0.0)
    plain = dict(graphdef=target.graphdef, state=target.state, prompts=prompts, prompt_lens=prompt_lens, key=keys,
                 params=params, stop_ids=(), pad_id=target.config.pad_token_id)
    runs = {"plain decoding": lambda: generate(**plain, max_new_tokens=new),
            "plain decoding, 1 token": lambda: generate(**plain, max_new_tokens=1)}
    for spec in args.drafters.split(","):
        drafter = with_block_size(load_drafter(spec, target, gamma=args.gamma), args.gamma)
        models = dict(target_graphdef=target.graphdef, target_state=target.state, drafter_graphdef=drafter.graphdef,
                      drafter_state=drafter.state)
        start = speculative_start(**models, prompts=prompts, prompt_lens=prompt_lens, key=keys, params=params,
                                  confidence_threshold=threshold, max_new_tokens=new, stop_ids=())
        runs[spec] = (lambda models=models, start=start: speculative_rounds(
            **models, state=start, params=params, confidence_threshold=threshold, choice=jnp.int32(-1),
            num_rounds=jnp.int32(args.rounds), max_new_tokens=new, stop_ids=()))
    times = interleaved_seconds(runs, args.repeats)
    steps = [a - b for a, b in zip(times["plain decoding"], times["plain decoding, 1 token"])]
    rows = {"plain decoding's steps": steps} | {k: v for k, v in times.items() if k not in
                                                ("plain decoding", "plain decoding, 1 token")}
    print(f"machine: {describe_machine()}; {args.dataset}'s first held-out prompt, batch 1, {args.rounds} rounds, "
          f"{args.repeats} interleaved repeats")
    for k, ts in rows.items():
        print(f"  {k:<24} best {1e3 * min(ts) / args.rounds:6.2f} ms a round, median "
              f"{1e3 * float(np.median(ts)) / args.rounds:6.2f} ms")
    write_result(args.output, {"machine": describe_machine(), **vars(args),
                               "seconds": {k: list(map(float, ts)) for k, ts in rows.items()}})


if __name__ == "__main__":
    main()

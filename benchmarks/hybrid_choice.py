"""The hybrid's choice at a fixed draft length, T = 0: its τ against the two drafters it chooses between, and
how the model's record in the request (`drafters.hybrid`, `model_prior_strength`) moves it.

    python benchmarks/hybrid_choice.py [--datasets gsm8k,humaneval,mbpp,mt-bench --limit 8 --max_new_tokens 96
                                        --gamma 7 --batch_size 1 --strengths 1e9,4,1]

At T = 0 with a fixed γ every round verifies all of its drafts and τ (committed tokens per round, bonus
included) depends on the drafts only, not on the machine: no timing here (`benchmarks/ngram.py` times).
A strength of 1e9 weighs the head against its record as if it had been right a billion times: the choice
before the record existed. Per set, which source each verified round came from is not exposed by the loop,
so the table gives τ only. Writes JSON.
"""
from __future__ import annotations

import argparse


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="gsm8k,humaneval,mbpp,mt-bench")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--n_max", type=int, default=3)
    ap.add_argument("--n_min", type=int, default=1)
    ap.add_argument("--model", default="default", help="the trained drafter (a --drafter value)")
    ap.add_argument("--strengths", default="1e9,4,1", help="model_prior_strength values of the hybrid")
    ap.add_argument("--output", default="benchmarks/results/hybrid_choice.json")
    args = ap.parse_args()

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.drafters.factory import hybrid_drafter, load_drafter, with_block_size
    from dspark_jax.generation import GenerationConfig, generate_text, pooled_accept_length, release_compiled_programs
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    target = load_target()
    lookup_spec = f"ngram:n_max={args.n_max},n_min={args.n_min}"

    model = with_block_size(load_drafter(args.model, target, gamma=args.gamma), args.gamma)
    lookup = with_block_size(load_drafter(lookup_spec, target, gamma=args.gamma), args.gamma)
    drafters = {"lookup": lookup, "model": model}
    for s in args.strengths.split(","):
        hybrid = hybrid_drafter(model, target, lookup_spec, model_prior_strength=float(s))
        drafters[f"hybrid s={s}"] = with_block_size(hybrid, args.gamma)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    rows = []
    print(f"machine: {describe_machine()}; T=0, gamma {args.gamma}, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens")
    print(f"{'dataset':<10} " + " ".join(f"{k:>14}" for k in drafters))
    for name in args.datasets.split(","):
        prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path(name))[:args.limit]]
        taus, outputs = {}, {}
        for label, drafter in drafters.items():
            res = generate_text(target, prompts, cfg, drafter=drafter)
            taus[label], outputs[label] = pooled_accept_length(res), [r.completion_ids for r in res]
            release_compiled_programs()
        same = all(o == outputs["lookup"] for o in outputs.values())
        rows.append(dict(dataset=name, tau=taus, outputs_identical=same))
        print(f"{name:<10} " + " ".join(f"{t:14.2f}" for t in taus.values()) + ("" if same else "  OUTPUTS DIFFER"),
              flush=True)
        write_result(args.output, dict(machine=describe_machine(), target=target.config.name, **vars(args),
                                       rows=rows))


if __name__ == "__main__":
    main()

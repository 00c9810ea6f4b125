"""Where the main job's loop spends its time beyond plain decoding on a batch where nothing drafts (issue 13's
"never below 1.0x at batch 8"): plain decoding, the auto loop (`--draft_length auto`: the cached round-cost profile,
the gate, the hybrid's pricing), the loop's prefill alone (`speculative_start`: the target's prefill with taps and the
drafter's) against plain decoding's (a 1-token generate), and the loop's plain rounds alone (`speculative_rounds`
forced plain, as many as the auto loop ran rounds). Timed in interleaved repeats on one batch; each row's best and
median. Also the auto loop's rounds: how many probed (drafted rounds: the proposal ran — the model's forward or the
lookup alone — and whatever was verified), how many proposals the gate declined (`SpecOutput.declined_rounds`) and the profile's costs of a plain round, a model round and a lookup-only
round at the smallest bucket.
The library's path is timed beside them: `generate_text` plain and with `draft_length="auto"` (what `ngram.py` and
`dspark generate` time: tokenizing, the ahead-of-time compiled executable, the output's transfer, detokenizing), wall
clock and the `Completion.seconds` it reports.

    python benchmarks/loop_attribution.py [--dataset mbpp --batch_size 8 --repeats 5]

Writes JSON.
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mbpp")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--drafter", default="default+ngram")
    ap.add_argument("--gamma", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", default="benchmarks/results/loop_attribution.json")
    args = ap.parse_args()

    from round_check import round_proposals  # benchmarks/, the script's own directory

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.decoding.autoregressive import generate
    from dspark_jax.decoding.speculative import draft_head, speculative_generate, speculative_rounds, speculative_start
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.generation import GenerationConfig, encode_prompts, generate_text, pad_batch
    from dspark_jax.round_costs import load_or_profile_round_costs
    from dspark_jax.sampling import SamplingParams
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result
    from dspark_jax.utils.timing import interleaved_seconds

    bs, new = args.batch_size, args.max_new_tokens
    target = load_target()
    drafter = with_block_size(load_drafter(args.drafter, target, gamma=args.gamma), args.gamma)
    head = draft_head(target.graphdef, target.state, drafter.graphdef, drafter.state)
    prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path(args.dataset))[:bs]]
    tokens, lens = pad_batch(encode_prompts(target, prompts, new), target.config.pad_token_id, bs)
    prompts_, lens_, keys = jnp.asarray(tokens), jnp.asarray(lens), jax.random.split(jax.random.key(0), bs)
    params, thr, stops = SamplingParams.create(bs, 0.0, 0, 1.0), jnp.float32(0.0), target.stop_ids
    settings = load_or_profile_round_costs(target, drafter, bs, int(tokens.shape[1]), new).loop_settings(5)
    spec = dict(target_graphdef=target.graphdef, target_state=target.state, drafter_graphdef=drafter.graphdef,
                drafter_state=drafter.state, prompts=prompts_, prompt_lens=lens_, key=keys, params=params,
                confidence_threshold=thr, max_new_tokens=new, stop_ids=stops)
    plain_args = dict(graphdef=target.graphdef, state=target.state, prompts=prompts_, prompt_lens=lens_, key=keys,
                      params=params, stop_ids=stops, pad_id=target.config.pad_token_id)
    auto = jax.block_until_ready(speculative_generate(**spec, head=head, **settings))
    rounds = int(np.asarray(auto.rounds).max())
    start = speculative_start(**spec)
    cfg = GenerationConfig(max_new_tokens=new, batch_size=bs)
    reported = {"generate_text plain": [], "generate_text auto": []}  # label → Completion.seconds per run

    def library(label, **kw):
        def run():
            res = generate_text(target, prompts, cfg if not kw else GenerationConfig(
                max_new_tokens=new, batch_size=bs, draft_length="auto"), **kw)
            reported[label].append(res[0].seconds)
            return res
        return run

    runs = {
        "plain decoding": lambda: generate(**plain_args, max_new_tokens=new),
        "generate_text plain": library("generate_text plain"),
        "generate_text auto": library("generate_text auto", drafter=drafter),
        "auto loop": lambda: speculative_generate(**spec, head=head, **settings),
        "plain decoding's prefill (1 token)": lambda: generate(**plain_args, max_new_tokens=1),
        "loop's prefill (speculative_start)": lambda: speculative_start(**spec),
        f"loop's plain rounds alone ({rounds})": lambda: speculative_rounds(
            target.graphdef, target.state, drafter.graphdef, drafter.state, start, params, thr, jnp.int32(-1),
            jnp.int32(rounds), max_new_tokens=new, stop_ids=stops),
    }
    for run in runs.values():  # compile and warm up (the library's reported times start after it)
        jax.block_until_ready(run())
    for ts in reported.values():
        ts.clear()
    times = interleaved_seconds(runs, args.repeats, warmup=False)
    conf = np.asarray(auto.confidence)[:, :rounds]
    probed = round_proposals(conf, np.asarray(auto.model_forward)[:, :rounds]).any(0)
    model_rounds = int(np.asarray(auto.model_forward)[:, :rounds].any(0).sum())
    paired = [a / p for a, p in zip(times["auto loop"], times["plain decoding"])]
    print(f"machine: {describe_machine()}; {args.dataset}, batch {bs}, {new} new tokens, {args.drafter} γ {args.gamma}")
    declined = int(auto.declined_rounds)
    print(f"auto loop: {rounds} rounds, {int(probed.sum())} probed (with a proposal; {model_rounds} ran the model's "
          f"forward), {declined} proposals declined (not verified, not among the rounds), "
          f"{int(np.asarray(auto.accepted).sum())} drafts accepted; auto / plain paired median "
          f"{np.median(paired):.3f} [{min(paired):.3f}, {max(paired):.3f}]")
    print(f"profile: plain round {settings['plain_cost']:.4f} s, bucket {settings['verify_buckets'][0]} with the model "
          f"{settings['verify_costs'][0]:.4f} s, lookup only {(settings.get('lookup_costs') or [float('nan')])[0]:.4f} s")
    for k, ts in times.items():
        print(f"  {k:<36} best {min(ts):7.3f} s   median {np.median(ts):7.3f} s")
    for k, ts in reported.items():
        print(f"  {k + ' (its Completion.seconds)':<36} best {min(ts):7.3f} s   median {np.median(ts):7.3f} s")
    library_paired = [a / p for a, p in zip(reported["generate_text auto"], reported["generate_text plain"])]
    print(f"generate_text auto / plain (Completion.seconds) paired median {np.median(library_paired):.3f} "
          f"[{min(library_paired):.3f}, {max(library_paired):.3f}]")
    write_result(args.output, dict(machine=describe_machine(), **vars(args), rounds=rounds, probed=int(probed.sum()),
                                   declined=declined, model_rounds=model_rounds, accepted=int(np.asarray(auto.accepted).sum()),
                                   identical_to_plain=bool((np.asarray(auto.tokens) == np.asarray(
                                       runs["plain decoding"]().tokens)).all()),
                                   paired_auto_over_plain=paired, times=times, reported_seconds=reported,
                                   paired_generate_text_auto_over_plain=library_paired, settings={
                                       k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}))


if __name__ == "__main__":
    main()

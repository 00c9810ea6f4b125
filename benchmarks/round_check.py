"""Does the hardware-aware draft length see what the run does? For speculative runs with `draft_length="auto"`:
the measured wall time of each batch against the round-cost profile's prediction for the rounds it ran
(prefill timed apart), and the drafts the confidences expected to be accepted against those accepted.

    python benchmarks/round_check.py [--datasets mbpp,mt-bench --limit 8 --batch_size 8 --drafter ngram
                                      --gamma 11 --max_new_tokens 96]

Per round r of a batch: the bucket is the smallest compiled bucket holding its rows (active requests' anchors +
verified drafts; a round that proposed nothing — no confidence recorded, no model forward — is a plain round), its
predicted cost the profile's seconds for that bucket (`round_costs`): a hybrid's rounds by its table with the
model's forward where the round ran it (`RoundStats.model_forward`, recorded since session 44) and by its lookup-only
table where it did not. The predicted speed-up, (prefill + plain decoding's steps × the profiled plain round) /
(prefill + the rounds' predicted seconds), does not move with the machine's load between runs: it compares
schedules on one profile (BENCHMARKS.md "Session 46"). Expected accepted
drafts: Σ over verified drafts of the prefix survival Π_{i<=j} c_i of the confidences recorded for the round (at
T = 0 the ones the bucket was chosen from).
A ratio measured/predicted well above 1 means the loop pays for something the profile does not time; expected /
accepted above 1 means the confidences over-predict. Plain decoding (`decoding.autoregressive`) is timed on the same
batch: its time per step after the prefill against the loop's profiled plain round is the floor the gate can reach
(a loop that keeps every round plain runs at that ratio to plain decoding). Writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


def round_buckets(rounds: np.ndarray, verified: np.ndarray, buckets: tuple[int, ...],
                  proposed: np.ndarray | None = None) -> list[int | None]:
    """Per global round of one batch: the smallest bucket holding its rows, None for a plain round — one that
    proposed nothing (proposed [B, R] bool: a request's round had a proposal), or without `proposed` one with no
    verified draft. rounds [B], verified [B, R]."""
    out = []
    for r in range(int(rounds.max(initial=0))):
        active = rounds > r
        drafts = int(verified[active, r].sum())
        rows = int(active.sum()) + drafts
        drafted = drafts > 0 if proposed is None else bool(proposed[active, r].any())
        out.append(next((t for t in buckets if t >= rows), buckets[-1]) if drafted else None)
    return out


def round_proposals(confidence: np.ndarray, model_forward: np.ndarray) -> np.ndarray:
    """[B, R] bool: the request's round had a proposal — a confidence recorded (plain rounds record zeros) or the
    model's forward run. confidence [B, R, G], model_forward [B, R]."""
    return (np.abs(confidence).sum(-1) > 0) | model_forward


def round_model_forward(rounds: np.ndarray, model_forward: np.ndarray) -> list[bool]:
    """Per global round of one batch: whether the round ran the drafter model's forward (for any active
    request: one forward serves the batch). rounds [B], model_forward [B, R]."""
    return [bool(model_forward[rounds > r, r].any()) for r in range(int(rounds.max(initial=0)))]


def expected_accepted(rounds: np.ndarray, verified: np.ndarray, confidence: np.ndarray) -> float:
    """Σ over requests, rounds and verified drafts j of Π_{i<=j} c_i. confidence [B, R, G]."""
    total = 0.0
    for b in range(rounds.shape[0]):
        for r in range(int(rounds[b])):
            n = int(verified[b, r])
            if n:
                total += float(np.cumprod(np.clip(confidence[b, r, :n], 0.0, 1.0)).sum())
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="gsm8k,humaneval,mbpp,mt-bench")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--drafter", default="ngram")
    ap.add_argument("--gamma", type=int, default=11)
    ap.add_argument("--output", default="benchmarks/results/round_check.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.decoding.speculative import speculative_start
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.generation import (
        GenerationConfig,
        bucket_length,
        decode_batches,
        encode_prompts,
        pad_batch,
    )
    from dspark_jax.round_costs import load_or_profile_round_costs
    from dspark_jax.sampling import SamplingParams
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    target = load_target()
    drafter = load_drafter(args.drafter, target, gamma=args.gamma)
    if drafter.config.block_size != args.gamma:
        drafter = with_block_size(drafter, args.gamma)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, draft_length="auto")
    rows = []
    print(f"machine: {describe_machine()}; drafter {args.drafter} gamma {args.gamma}, batch {args.batch_size}")
    print(f"{'dataset':<10} {'batch':>5} {'measured s':>10} {'prefill s':>9} {'rounds s (pred)':>15} {'ratio':>6} "
          f"{'expected acc':>12} {'accepted':>8} {'rounds by bucket'}")
    for name in args.datasets.split(","):
        prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path(name))[:args.limit]]
        encoded = encode_prompts(target, prompts, cfg.max_new_tokens)
        bs = min(cfg.batch_size, len(encoded))
        costs = load_or_profile_round_costs(target, drafter, bs, bucket_length(max(len(p) for p in encoded)),
                                            cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                            top_p=cfg.top_p)
        settings = costs.loop_settings()  # what the run's loop compiles (generation.py)
        buckets, seconds = settings["verify_buckets"], settings["verify_costs"]
        cost = dict(zip(buckets, seconds))
        lookup_cost = dict(zip(buckets, settings.get("lookup_costs") or seconds))  # a hybrid's rounds without the model
        static = dict(target_graphdef=target.graphdef, drafter_graphdef=drafter.graphdef,
                      max_new_tokens=cfg.max_new_tokens, stop_ids=target.stop_ids, pad_id=target.config.pad_token_id,
                      **settings)
        plain_walls = [w for *_, w in decode_batches(target, encoded, dataclasses.replace(cfg, draft_length="fixed"))]
        for (start, count, out, wall), plain_wall in zip(decode_batches(target, encoded, cfg, drafter), plain_walls):
            tokens, lens = pad_batch(encoded[start:start + count], target.config.pad_token_id, bs)
            args_start = dict(target_state=target.state, drafter_state=drafter.state, prompts=jnp.asarray(tokens),
                              prompt_lens=jnp.asarray(lens), key=jax.random.split(jax.random.key(0), bs),
                              params=SamplingParams.create(bs, 0.0, 0, 1.0), confidence_threshold=jnp.float32(0.0))
            prefill_fn = speculative_start.lower(**args_start, **static).compile()
            jax.block_until_ready(prefill_fn(**args_start))
            t0 = time.perf_counter()
            jax.block_until_ready(prefill_fn(**args_start))
            prefill = time.perf_counter() - t0
            rounds, verified = np.asarray(out.rounds), np.asarray(out.proposed)
            model_forward = np.asarray(out.model_forward)
            per_round = round_buckets(rounds, verified, buckets,
                                      round_proposals(np.asarray(out.confidence), model_forward))
            ran_model = round_model_forward(rounds, model_forward)
            predicted = sum(costs.plain if t is None else (cost if ran else lookup_cost)[t]
                            for t, ran in zip(per_round, ran_model))
            expected = expected_accepted(rounds, verified, np.asarray(out.confidence))
            accepted = int(sum(np.asarray(out.accepted)[b, :rounds[b]].sum() for b in range(bs)))
            by_bucket = {str(t or "plain"): per_round.count(t) for t in [None, *buckets] if per_round.count(t)}
            steps = int(np.asarray(out.num_tokens).max()) - 1  # plain decoding's steps after the prefill
            predicted_speedup = (prefill + steps * costs.plain) / (prefill + predicted)
            row = dict(dataset=name, batch_start=start, batch_size=bs, measured_s=wall, prefill_s=prefill,
                       plain_decoding_s=plain_wall, plain_step_s=(plain_wall - prefill) / max(steps, 1),
                       predicted_rounds_s=predicted, ratio=wall / (prefill + predicted),
                       predicted_speedup=predicted_speedup, model_rounds=int(sum(ran_model)),
                       expected_accepted=expected, accepted=accepted, rounds_by_bucket=by_bucket,
                       rounds_per_request=rounds.tolist(), tokens_per_request=np.asarray(out.num_tokens).tolist(),
                       profile=dict(buckets=buckets, seconds=seconds, plain=costs.plain))
            rows.append(row)
            print(f"{name:<10} {bs:>5} {wall:10.2f} {prefill:9.2f} {predicted:15.2f} {row['ratio']:6.2f} "
                  f"{expected:12.1f} {accepted:8d} {by_bucket}", flush=True)
            print(f"{'':<10} rounds per request {rounds.tolist()}, tokens {np.asarray(out.num_tokens).tolist()}", flush=True)
            print(f"{'':<10} predicted speed-up {predicted_speedup:.3f}x (profile; {int(sum(ran_model))} rounds ran the "
                  f"model's forward)", flush=True)
            print(f"{'':<10} plain decoding {plain_wall:.2f} s (speculative: {plain_wall / wall:.2f}x its speed): "
                  f"{row['plain_step_s'] * 1e3:.1f} ms per step after the prefill vs the loop's profiled plain round "
                  f"{costs.plain * 1e3:.1f} ms", flush=True)
        write_result(args.output, dict(machine=describe_machine(), **vars(args), rows=rows))


if __name__ == "__main__":
    main()

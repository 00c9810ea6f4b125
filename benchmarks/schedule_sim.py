"""Replays the jitted loop's draft-length scheduling offline for prompt lookup at T = 0: seconds, not an hour.

At T = 0 the loop commits exactly plain decoding's tokens, and a lookup proposal is a function of the tokens
committed so far, so a round's outcome is known without the target: its drafts are accepted while they equal
the greedy output. `SimulatedRounds` is the loop's own round code (`decoding.speculative._Rounds`: proposal,
gate, bucket choice, drafter commit, bookkeeping) with the target's verification (and plain rounds' forward)
replaced by that comparison;
each round is charged the round-cost profile's seconds (`round_costs`, the same profile the loop uses, within
3 % of measured wall time: `benchmarks/round_check.py`). The prediction it gives — seconds of a batch's rounds
against an all-plain loop's (`plain` × plain decoding's steps) — compares schedules, not machines.

    python benchmarks/schedule_sim.py [--datasets gsm8k,humaneval,mbpp,mt-bench --limit 8 --batch_size 8
                                       --gamma 11 --max_new_tokens 96 --objectives fluid,one_round,throughput
                                       --gate_margins 0]

Greedy outputs come from plain decoding once and are cached (`--greedy_cache`). Writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="gsm8k,humaneval,mbpp,mt-bench")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--gamma", type=int, default=11)
    ap.add_argument("--drafter", default="ngram:n_max=3,n_min=1",
                    help="a lookup --drafter value; the default is benchmarks/ngram.py's, so both read one "
                    "cost profile")
    ap.add_argument("--objectives", default="fluid,one_round,throughput", help="`draft_length.GAINS` keys")
    ap.add_argument("--gate_margins", default="0", help="comma list of m: the replayed gate drafts only when the "
                    "best bucket's rate beats a plain round's by more than a factor 1 + m (the loop's gate: m = 0)")
    ap.add_argument("--greedy_cache", default="runs/greedy_outputs.json")
    ap.add_argument("--output", default="benchmarks/results/schedule_sim.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.decoding.speculative import RoundStats, SpecState, _Rounds
    from dspark_jax.decoding.verification import RoundResult
    from dspark_jax.drafters.base import Proposal, RoundOutcome
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.generation import GenerationConfig, bucket_length, decode_batches, encode_prompts, pad_batch
    from dspark_jax.round_costs import load_or_profile_round_costs
    from dspark_jax.sampling import FilterMode, SamplingParams
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result
    from round_check import round_buckets

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, draft_length="fixed")
    target = load_target().with_attn_impl(cfg.attn_impl)  # as `generation.decode_batches`: the same cost profile
    drafter = load_drafter(args.drafter, target, gamma=args.gamma)
    if drafter.config.block_size != args.gamma:
        drafter = with_block_size(drafter, args.gamma)
    drafter = drafter.with_attn_impl(cfg.attn_impl)
    module = nnx.merge(drafter.graphdef, drafter.state)
    g = args.gamma
    cache_path = Path(args.greedy_cache)
    greedy = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    @dataclasses.dataclass(frozen=True)
    class SimulatedRounds(_Rounds):
        truth: jax.Array = None  # [B, max_new + G + 1] greedy output, stop token included, then pads
        truth_len: jax.Array = None  # [B] tokens of the greedy output

        def _verify(self, c, proposal, num_verify, bucket, rows, plain=False):
            b = c.anchor.shape[0]
            idx = c.num_generated[:, None] + jnp.arange(g + 1)[None]
            nxt = jnp.take_along_axis(self.truth, jnp.minimum(idx, self.truth.shape[1] - 1), axis=1)  # [B, G+1]
            drafts = jnp.pad(proposal.tokens, ((0, 0), (0, g - proposal.tokens.shape[1])))
            flags = (drafts == nxt[:, :g]) & (jnp.arange(g)[None] < num_verify[:, None])
            a = jnp.cumprod(flags, axis=1).sum(1).astype(jnp.int32)
            active = ~c.done
            count = jnp.where(active, jnp.minimum(a + 1, self.truth_len - c.num_generated), 0)
            grid = jnp.concatenate([c.anchor[:, None], drafts], 1)
            outcome = None if plain else RoundOutcome(num_verify, nxt, proposal.deterministic,
                                                      lookup_draft=proposal.lookup_draft)  # as the loop's
            state = module.commit(None, c.drafter_state, None, grid, c.start, count, outcome)
            last = jnp.take_along_axis(nxt, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
            stopped = active & (c.num_generated + count >= self.truth_len) & (self.truth_len < self.max_new_tokens)
            return RoundResult(committed=nxt, count=count, num_accepted=jnp.where(active, a, 0),
                               accept_flags=(jnp.cumprod(flags, axis=1) > 0) & active[:, None], stopped=stopped,
                               anchor=jnp.where(count > 0, last, c.anchor), target_cache=None, drafter_state=state,
                               nonfinite=jnp.zeros((b,), bool))

        def plain(self, c):
            b = c.anchor.shape[0]
            empty = Proposal(tokens=jnp.zeros((b, 0), jnp.int32), draft_index=None, p_draft=None,
                             confidence=None, confidence_logits=None)
            none, no_conf, no = jnp.zeros((b,), jnp.int32), jnp.zeros((b, g), jnp.float32), jnp.zeros((b,), bool)
            res = self._verify(c, empty, none, b, 1, plain=True)
            c = dataclasses.replace(c, plain_left=c.plain_left - 1)
            return self._commit(c, res, none, no_conf, no_conf, no, no, jnp.zeros((b,), jnp.float32))

        def _apply(self, c, o):
            c = self._gate_state(c, o)
            return self._commit(c, o.res, o.verified, o.confidence, o.confidence_logits, o.model_forward,
                                o.lookup_draft, o.lookup_expected, counted=~jnp.asarray(o.declined))

    def simulate(prompts, truth, truth_len, buckets, seconds, plain, objective, margin):
        b = len(prompts)
        tokens, lens = pad_batch(prompts, target.config.pad_token_id, b)
        cache_len = tokens.shape[1] + args.max_new_tokens + g + 1
        tr = np.zeros((b, args.max_new_tokens + g + 1), np.int32)
        for i, t in enumerate(truth):
            tr[i, :len(t)] = t
        rounds = SimulatedRounds(target=None, drafter=module, head=None, params=SamplingParams.create(b, 0.0, 0, 1.0),
                                 mode=FilterMode(), stops=jnp.asarray(target.stop_ids, jnp.int32),
                                 threshold=jnp.float32(0.0), max_new_tokens=args.max_new_tokens, buckets=buckets,
                                 costs=seconds, plain_cost=plain / (1 + margin), truth=jnp.asarray(tr),
                                 truth_len=jnp.asarray(truth_len, jnp.int32), objective=objective)
        state0 = module.prefill(None, module.init_state(b, cache_len), None, jnp.asarray(tokens), jnp.asarray(lens))
        first = jnp.asarray(tr[:, 0])
        c = SpecState(keys=jax.random.split(jax.random.key(0), b), anchor=first, start=jnp.asarray(lens, jnp.int32),
                      target_cache=None, drafter_state=state0,
                      tokens=jnp.zeros((b, args.max_new_tokens + g + 1), jnp.int32).at[:, 0].set(first),
                      num_generated=jnp.ones((b,), jnp.int32), done=jnp.asarray(truth_len) <= 1,
                      rounds=jnp.zeros((b,), jnp.int32), stats=RoundStats.zeros(b, args.max_new_tokens, g),
                      nonfinite=jnp.zeros((b,), bool), plain_left=jnp.int32(0), backoff=jnp.int32(1),
                      stale_confidence=jnp.full((b, g), -1.0, jnp.float32), progress=jnp.zeros((2,), jnp.float32),
                      declined=jnp.int32(0))
        final = jax.jit(lambda s: jax.lax.while_loop(lambda x: ~jnp.all(x.done), rounds.step, s))(c)
        out_tokens = np.asarray(final.tokens)
        assert all((out_tokens[i, :truth_len[i]] == tr[i, :truth_len[i]]).all() for i in range(b)), "replay diverged"
        r, verified = np.asarray(final.rounds), np.asarray(final.stats.proposed)
        per_round = round_buckets(r, verified, buckets)
        cost = dict(zip(buckets, seconds))
        loop_s = sum(plain if t is None else cost[t] for t in per_round)
        accepted = np.asarray(final.stats.accepted)
        tau = float(np.asarray(final.num_generated).sum() - b) / max(int(r.sum()), 1)
        return dict(loop_s=loop_s, plain_s=plain * (max(truth_len) - 1), rounds=len(per_round),
                    drafted_rounds=sum(t is not None for t in per_round), tau=tau,
                    accepted=int(sum(accepted[i, :r[i]].sum() for i in range(b))))

    print(f"machine: {describe_machine()}; lookup gamma {g}, batch {args.batch_size}")
    print(f"{'dataset':<10} {'objective':<12} {'rounds':>6} {'drafted':>7} {'accepted':>8} {'tau':>5} "
          f"{'pred s':>7} {'plain s':>7} {'speed-up':>8}")
    rows = []
    for name in args.datasets.split(","):
        prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path(name))[:args.limit]]
        encoded = encode_prompts(target, prompts, args.max_new_tokens)
        key = f"{name}:{args.limit}:{args.max_new_tokens}"
        if key not in greedy:
            outs = []
            for _, count, out, _ in decode_batches(target, encoded, cfg):
                outs += [np.asarray(out.tokens[i, :int(out.num_tokens[i])]).tolist() for i in range(count)]
            greedy[key] = outs
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(greedy))
        bs = min(args.batch_size, len(encoded))
        costs = load_or_profile_round_costs(target, drafter, bs, bucket_length(max(len(p) for p in encoded)),
                                            args.max_new_tokens)
        buckets, seconds = costs.efficient()
        for objective, margin in ((o, float(m)) for o in args.objectives.split(",")
                                  for m in args.gate_margins.split(",")):
            tot = dict(loop_s=0.0, plain_s=0.0, rounds=0, drafted_rounds=0, accepted=0)
            taus = []
            for s in range(0, len(encoded), bs):
                chunk, truth = encoded[s:s + bs], greedy[key][s:s + bs]
                res = simulate(chunk, truth, [len(t) for t in truth], buckets, seconds, costs.plain, objective,
                               margin)
                taus.append(res.pop("tau"))
                for k in tot:
                    tot[k] += res[k]
            row = dict(dataset=name, objective=objective, gate_margin=margin, tau=float(np.mean(taus)), **tot,
                       speed_up=tot["plain_s"] / tot["loop_s"])
            rows.append(row)
            print(f"{name:<10} {objective + (f' m={margin:g}' if margin else ''):<12} {tot['rounds']:6d} {tot['drafted_rounds']:7d} {tot['accepted']:8d} "
                  f"{row['tau']:5.2f} {tot['loop_s']:7.2f} {tot['plain_s']:7.2f} {row['speed_up']:8.2f}", flush=True)
    write_result(args.output, dict(machine=describe_machine(), **vars(args), rows=rows))


if __name__ == "__main__":
    main()

"""Where a round's time goes, op by op: XLA's own trace (`jax.profiler`, one event per executed HLO op) of plain
decoding's steps, of the speculative loop's plain rounds and of its rounds at given verification buckets, on one
batch of held-out prompts. Each op's exclusive time (its nested ops' removed) per step or round, grouped by the kind
of op XLA:CPU ran (`ffi_call`: the int8 block kernel of the output head and the layers' projections; `ynn_fusion`:
XLA's dots and reductions through YNNPACK; …), and the ops that take the most, each named by the JAX operation it
came from (the compiled program's `op_name` metadata).

Differences between rows are attributed by op, not by timing whole variants against each other: on a 2-core CPU
two timings of one program move by 10–15 %, more than the differences sought (BENCHMARKS.md "Session 55"), while an
op that one program runs every round and the other never is there in every trace. An op's time still moves between
traces with the machine; compare ops within one run. Op times are not wall time: XLA:CPU runs independent ops
at once on its thread pool, so where a round runs work beside the forward (a verification round's proposal and
bookkeeping) its ops share the 2 cores, each takes longer, and their sum exceeds the round's wall time — compare
such rows by which ops they run, and time them whole (`round_costs`) for what they cost.

Only the ops a program runs in every step or round count (at least once per iteration: the prefill and the setup
are left out), each divided by the number of iterations. Plain decoding generates max_new_tokens + G + 1 tokens so
that its cache is as long as the loop's (prompt bucket + max_new_tokens + G + 1): both read the same attention
span.

    python benchmarks/op_trace.py [--dataset mbpp --batch_size 8 --buckets 8,16 --rounds 20]

Prints tables and writes JSON.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile


def exclusive_ms(trace_dir: str) -> tuple[dict[str, float], dict[str, int]]:
    """{op: exclusive milliseconds} and {op: events} of the XLA ops in the perfetto trace under trace_dir: each
    event's duration less those of the events nested in it on the same thread; the executor's own spans and
    Python's are left out."""
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[-1]
    data = json.load(gzip.open(path))
    events = [e for e in (data["traceEvents"] if isinstance(data, dict) else data)
              if e.get("ph") == "X" and not e["name"].startswith("$")]
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e["tid"])].append(e)
    own, count = collections.Counter(), collections.Counter()
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in thread:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                own[stack[-1]["name"]] -= e["dur"]
            own[e["name"]] += e["dur"]
            count[e["name"]] += 1
            stack.append(e)
    skip = re.compile(r"Execute|^Pjit|^end: |ParseArguments|Handle inputs|ThreadPool")
    return ({k: v / 1e3 for k, v in own.items() if not skip.search(k)},
            {k: v for k, v in count.items() if not skip.search(k)})


def op_kind(name: str) -> str:
    """An HLO instruction's kind from its name: `ynn_fusion.684` → `ynn_fusion`."""
    return re.sub(r"(\.clone)*(\.\d+)*(\.clone)*$", "", re.sub(r"\.clone", "", name))


def op_names(hlo_text: str) -> dict[str, str]:
    """{instruction: the JAX operation it came from} from a compiled program's text (`op_name` metadata)."""
    found = {}
    for m in re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", hlo_text):
        found[m.group(1)] = m.group(2)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mbpp")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--drafter", default="default+ngram")
    ap.add_argument("--gamma", type=int, default=15)
    ap.add_argument("--buckets", default="", help="verification buckets to trace (rows; default: the batch's "
                                                  "anchors and one draft per request)")
    ap.add_argument("--variant", default="lookup", choices=("lookup", "model"),
                    help="a hybrid drafter's rounds without its model's forward (lookup) or with it")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--output", default="benchmarks/results/op_trace.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from dspark_jax.data import eval_dataset_path, read_first_turns
    from dspark_jax.decoding.autoregressive import generate
    from dspark_jax.decoding.speculative import speculative_rounds, speculative_start
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.generation import encode_prompts, pad_batch
    from dspark_jax.round_costs import model_variants
    from dspark_jax.sampling import SamplingParams
    from dspark_jax.target import load_target
    from dspark_jax.training.responses import format_prompt
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    bs, new, n = args.batch_size, args.max_new_tokens, args.rounds
    target = load_target()
    drafter = with_block_size(load_drafter(args.drafter, target, gamma=args.gamma), args.gamma)
    variants = model_variants(drafter)
    drafter = variants[-1] if args.variant == "lookup" else variants[0]
    g = drafter.config.block_size
    buckets = tuple(int(b) for b in args.buckets.split(",")) if args.buckets else (bs, 2 * bs)
    prompts = [format_prompt(p) for p in read_first_turns(eval_dataset_path(args.dataset))[:bs]]
    tokens, lens = pad_batch(encode_prompts(target, prompts, new), target.config.pad_token_id, bs)
    prompts_, lens_ = jnp.asarray(tokens), jnp.asarray(lens)
    keys = jax.random.split(jax.random.key(0), bs)
    params, thr = SamplingParams.create(bs, 0.0, 0, 1.0), jnp.float32(0.0)
    static = dict(max_new_tokens=new, stop_ids=(), verify_buckets=buckets)
    state = speculative_start(target.graphdef, target.state, drafter.graphdef, drafter.state, prompts_, lens_, keys,
                              params, thr, pad_id=target.config.pad_token_id, **static)
    rounds_args = (target.graphdef, target.state, drafter.graphdef, drafter.state, state, params, thr)
    plain_args = dict(graphdef=target.graphdef, state=target.state, prompts=prompts_, prompt_lens=lens_, key=keys,
                      params=params, stop_ids=(), pad_id=target.config.pad_token_id)

    def loop(choice):
        return lambda: speculative_rounds(*rounds_args, jnp.int32(choice), jnp.int32(n), **static)

    # label → (run, iterations it times)
    runs = {"plain decoding's step": (lambda: generate(**plain_args, max_new_tokens=new + g + 1), new + g),
            "the loop's plain round": (loop(-1), n)}
    runs.update({f"a round at bucket {b} ({b - bs} drafts, {args.variant})": (loop(i), n)
                 for i, b in enumerate(buckets)})
    loop_names = op_names(speculative_rounds.lower(*rounds_args, jnp.int32(0), jnp.int32(n), **static).compile()
                          .as_text())  # one program for every choice (a traced argument)
    names = {label: loop_names for label in runs}
    names["plain decoding's step"] = op_names(generate.lower(**plain_args, max_new_tokens=new + g + 1).compile()
                                              .as_text())
    per_op, per_kind, totals = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (fn, iterations) in runs.items():
            print(f"tracing {label} ...", flush=True)
            jax.block_until_ready(fn())  # compiled and warm
            where = f"{tmp}/{len(per_op)}"
            jax.profiler.start_trace(where, create_perfetto_trace=True)
            jax.block_until_ready(fn())
            jax.profiler.stop_trace()
            ms, count = exclusive_ms(where)
            ops = collections.Counter({k: v / iterations for k, v in ms.items() if count[k] >= iterations})
            per_op[label] = ops
            kinds = collections.Counter()
            for k, v in ops.items():
                kinds[op_kind(k)] += v
            per_kind[label] = kinds
            totals[label] = sum(ops.values())
    labels = list(runs)
    print(f"machine: {describe_machine()}; {args.dataset}, batch {bs}, {args.drafter} γ {g} ({args.variant} rounds), "
          f"ms per step / round (exclusive op time, {n} rounds traced)")
    kinds = sorted(set().union(*per_kind.values()), key=lambda k: -max(abs(per_kind[x][k]) for x in labels))
    print("| op kind | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels))
    for k in kinds[:20]:
        print(f"| {k} | " + " | ".join(f"{per_kind[x][k]:.2f}" for x in labels) + " |")
    print("| **all ops** | " + " | ".join(f"**{totals[x]:.2f}**" for x in labels) + " |")
    for x in labels:
        print(f"\n{x}: the {args.top} ops that take the most")
        for k, v in per_op[x].most_common(args.top):
            print(f"  {v:7.3f} ms  {k:<28} {names[x].get(k, '')[-110:]}")
    write_result(args.output, dict(machine=describe_machine(), **vars(args), buckets_traced=list(buckets),
                                   total_ms=totals, by_kind={x: dict(per_kind[x]) for x in labels},
                                   by_op={x: {k: dict(ms=v, op_name=names[x].get(k, ""))
                                              for k, v in per_op[x].most_common(60)} for x in labels}))


if __name__ == "__main__":
    main()

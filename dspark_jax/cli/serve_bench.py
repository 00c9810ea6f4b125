"""`dspark serve-bench`: closed-loop load on the serving engine — C clients, each sending its next request
when the previous finishes — for several draft policies and concurrency levels, on the same target, drafter
and prompts. Reports aggregate tokens/s, per-user tokens/s, draft tokens verified per request per step and
accept length; writes serve_bench.json, serve_bench.md and plots (throughput vs per-user speed like the
paper's Fig. 7, verification budget vs concurrency like Fig. 8). Scheduler engines profile SPS(B) at start.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from absl import flags

from dspark_jax.cli.common import (define_flag, define_serving_flags, kv_buckets_flag, load_target_and_drafter,
                                   positive_ints, run_command)

FLAGS = flags.FLAGS


def _define_flags() -> None:
    define_serving_flags(kv_buckets=True)
    define_flag("string", "policies", "plain,fixed1,fixed3,fixed7,threshold,scheduler,scheduler_async",
                "Comma-separated policies: plain, fixedN, threshold[@T], scheduler, scheduler_async.")
    define_flag("string", "concurrency", "1,2,4,8,16,32", "Comma-separated numbers of concurrent clients.")
    define_flag("integer", "requests_per_client", 2, "Requests each client sends, one after the other.",
                lower_bound=1)
    define_flag("integer", "max_new_tokens", 32, "New tokens per request.", lower_bound=1)
    define_flag("float", "temperature", 0.0, "Sampling temperature of every request (0: greedy; no top-k / top-p).",
                lower_bound=0.0)
    define_flag("string", "prompt_sets", "humaneval,gsm8k,mt-bench", "Evaluation sets the prompts come from "
                "(interleaved), in the training prompt format.")
    define_flag("integer", "max_prompt_tokens", 96, "Prompts are cut to their first N tokens.", lower_bound=1)
    define_flag("integer", "max_len", 256, "Cache rows per slot.", lower_bound=16)
    define_flag("string", "output_dir", "benchmarks/results/serve_bench", "Where JSON, markdown and plots go.")


def body() -> None:
    from dspark_jax.evaluation.datasets import load_benchmarks
    from dspark_jax.serving.engine import Engine
    from dspark_jax.serving.closed_loop import closed_loop, engine_config
    from dspark_jax.serving.plots import plot_load
    from dspark_jax.utils.machine import describe_machine

    levels = positive_ints(FLAGS.concurrency, "concurrency")
    kv = kv_buckets_flag(FLAGS.kv_buckets, FLAGS.max_len)
    policies = [p.strip() for p in FLAGS.policies.split(",") if p.strip()]
    for p in policies:
        engine_config(p, max_len=FLAGS.max_len, kv_buckets=kv)  # validates before anything slow
    sets = load_benchmarks([s.strip() for s in FLAGS.prompt_sets.split(",") if s.strip()])
    target, drafter = load_target_and_drafter(FLAGS.target, FLAGS.drafter)
    per_set = [[target.tokenizer.encode(p, add_bos=True)[:FLAGS.max_prompt_tokens] for p in b.prompts] for b in sets]
    prompts = [p for group in zip(*per_set) for p in group]
    rows, rows_tables = [], {}
    out_dir = Path(FLAGS.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for c in levels:
        table = None  # SPS(B) is profiled once per engine size and shared by both scheduler variants
        for p in policies:
            print(f"[concurrency {c}] {p}: compiling{' + profiling' if p.startswith('scheduler') and table is None else ''}"
                  " ...", file=sys.stderr)
            engine = Engine(target, drafter, engine_config(p, slots=c, max_len=FLAGS.max_len, kv_buckets=kv,
                                                                  attn_impl=FLAGS.attn_impl), cost_table=table)
            if p.startswith("scheduler"):
                table = engine.cost_table
                rows_tables[c] = table.to_json()
            r = closed_loop(engine, p, prompts, c, FLAGS.requests_per_client, FLAGS.max_new_tokens,
                            temperature=FLAGS.temperature)
            rows.append(dataclasses.asdict(r))
            print(f"[concurrency {c}] {p}: {r.aggregate_tps:.1f} tok/s aggregate, {r.per_user_tps:.2f} tok/s/user, "
                  f"{r.verified_per_round:.2f} drafts verified/step, τ {r.accept_length:.2f}"
                  + (f", {r.plain_steps}/{r.steps} steps without drafter" if r.plain_steps else ""), file=sys.stderr)
            _write(out_dir, rows, rows_tables, describe_machine())  # partial results survive an interruption
    print(_markdown(rows))
    paths = plot_load(rows, out_dir)
    print(f"wrote {out_dir / 'serve_bench.json'}, {out_dir / 'serve_bench.md'}, "
          f"{', '.join(str(p) for p in paths)}", file=sys.stderr)


def _markdown(rows: list[dict]) -> str:
    lines = ["| concurrency | policy | aggregate tok/s | tok/s per user | drafts verified / step | τ | steps "
             "| of which without drafter |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['policy']} | {r['aggregate_tps']:.1f} | {r['per_user_tps']:.2f} | "
                     f"{r['verified_per_round']:.2f} | {r['accept_length']:.2f} | {r['steps']} | "
                     f"{r.get('plain_steps', 0)} |")
    return "\n".join(lines)


def _write(out_dir: Path, rows: list[dict], cost_tables: dict, machine: str) -> None:
    from dspark_jax.utils.files import atomic_write_text
    from dspark_jax.utils.results import write_result
    cmd = "dspark serve-bench " + " ".join(f"--{k}={getattr(FLAGS, k)}" for k in (
        "target", "drafter", "policies", "concurrency", "requests_per_client", "max_new_tokens", "temperature",
        "prompt_sets", "max_prompt_tokens", "max_len", "kv_buckets"))
    write_result(out_dir / "serve_bench.json", dict(command=cmd, machine=machine, results=rows,
                                                    cost_tables={str(k): v for k, v in cost_tables.items()}))
    atomic_write_text(out_dir / "serve_bench.md", f"`{cmd}`\n\nMachine: {machine}\n\n{_markdown(rows)}\n")


def run(argv: list[str]) -> None:
    _define_flags()
    run_command("serve-bench", __name__, __doc__, body, argv)

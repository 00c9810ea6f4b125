"""`dspark ab`: a controlled A/B test of speculative decoding per workload class (FinOps guide, phase 3).

Replays the same prompts per class -- code: humaneval, math: gsm8k (first 200), chat: mt-bench -- through
baseline decoding (speculation off for every request) and accelerated decoding (the class's policy) on ONE
engine, alternating the arms block by block so machine drift weighs on both alike. Writes the minimum-metrics
table per class and arm (tokens per cycle, rejection rate, p50/p95 latency, cost per successful request and per
output token, fallback rate) and a recommendation per class (keep / narrow / roll back) as ab.md, ab.json and
PNG plots.
"""
from __future__ import annotations

import dataclasses
import sys

from absl import flags

from dspark_jax.cli.common import define_flag, define_serving_flags, load_target_and_drafter, run_command

FLAGS = flags.FLAGS


def _define_flags() -> None:
    define_flag("string", "policy", "default", "Governance policy file (YAML or Python); 'default': the shipped "
                "policy (dspark_jax/governance/policies/default.yaml, also configs/policies/default.yaml).")
    define_flag("string", "tenant", "production", "Tenant the requests are sent as (must allow every class).")
    define_flag("string", "classes", "code,math,chat", "Comma-separated workload classes: code, math, chat.")
    define_flag("integer", "requests_per_class", 4, "Prompts per class (each runs once per arm).", lower_bound=1)
    define_flag("integer", "max_new_tokens", 32, "New tokens per request.", lower_bound=1)
    define_flag("integer", "concurrency", 3, "Requests running together (engine slots; block size).", lower_bound=1)
    define_flag("float", "cost_per_hour", None, "All-in serving cost per hour in USD (default: the policy's).")
    define_flag("string", "output_dir", "benchmarks/results/ab", "Where ab.md, ab.json and plots go.")
    define_serving_flags(attn_impl=False)
    define_flag("string", "engine_policy", "scheduler", "Engine draft policy for requests that do not set their "
                "own: scheduler (profiles SPS(B) at start; needed by hardware_aware classes), fixedN, threshold.")
    define_flag("integer", "max_prompt_tokens", 96, "Prompts are cut to their first N tokens.", lower_bound=1)
    define_flag("integer", "max_len", 256, "Cache rows per slot (prompt + new tokens + draft block must fit).",
                lower_bound=16)


def load_class_prompts(classes: list[str], n: int) -> dict[str, list[str]]:
    """The first `n` evaluation prompts of each class's set, in the target's prompt format."""
    from dspark_jax.evaluation.datasets import load_benchmark
    from dspark_jax.governance.ab import CLASS_PROMPT_SETS
    unknown = [c for c in classes if c not in CLASS_PROMPT_SETS]
    if unknown:
        raise ValueError(f"no evaluation prompt set for class {unknown[0]!r} (classes with prompts: "
                         f"{', '.join(CLASS_PROMPT_SETS)})")
    out = {}
    for c in classes:
        prompts = load_benchmark(CLASS_PROMPT_SETS[c], limit=n).prompts
        if len(prompts) < n:
            raise ValueError(f"{CLASS_PROMPT_SETS[c]} has only {len(prompts)} prompts, --requests_per_class is {n}")
        out[c] = list(prompts)
    return out


def command_line() -> str:
    flags_used = ("policy", "tenant", "classes", "requests_per_class", "max_new_tokens", "concurrency",
                  "cost_per_hour", "target", "drafter", "engine_policy", "max_prompt_tokens", "max_len", "output_dir")
    return "dspark ab " + " ".join(f"--{k}={getattr(FLAGS, k)}" for k in flags_used
                                   if getattr(FLAGS, k) is not None)


def body() -> None:
    from dspark_jax.governance import load_policy
    from dspark_jax.governance.ab import check_workload, run_ab
    from dspark_jax.governance.ab_report import ab_tables, format_markdown, write_ab
    from dspark_jax.serving.engine import Engine
    from dspark_jax.serving.closed_loop import engine_config
    from dspark_jax.utils.machine import describe_machine

    classes = list(dict.fromkeys(c.strip() for c in FLAGS.classes.split(",") if c.strip()))
    policy = load_policy(FLAGS.policy)
    if FLAGS.cost_per_hour is not None:
        if FLAGS.cost_per_hour <= 0:
            raise ValueError(f"--cost_per_hour must be > 0, got {FLAGS.cost_per_hour}")
        policy = dataclasses.replace(policy, cost_per_hour_usd=FLAGS.cost_per_hour)
    check_workload(policy, FLAGS.tenant, classes, FLAGS.max_new_tokens)
    texts = load_class_prompts(classes, FLAGS.requests_per_class)
    config = engine_config(FLAGS.engine_policy, slots=FLAGS.concurrency, max_len=FLAGS.max_len)
    if config.policy != "threshold":  # a static_threshold class without a floor must not get the engine default
        config = dataclasses.replace(config, threshold=0.0)
    target, drafter = load_target_and_drafter(FLAGS.target, FLAGS.drafter)
    if max(c.max_draft for c in policy.classes) > drafter.config.block_size:
        print(f"note: the drafter proposes at most {drafter.config.block_size} tokens; larger max_draft values are "
              f"capped", file=sys.stderr)
    need = FLAGS.max_prompt_tokens + FLAGS.max_new_tokens + drafter.config.block_size + 1
    if need > FLAGS.max_len:
        raise ValueError(f"--max_len {FLAGS.max_len} is too small: --max_prompt_tokens + --max_new_tokens + draft "
                         f"block + 1 = {need}")
    prompts = {c: [target.tokenizer.encode(t, add_bos=True)[:FLAGS.max_prompt_tokens] for t in ts]
               for c, ts in texts.items()}
    print(f"compiling the engine ({config.policy}, {config.slots} slots"
          f"{', then profiling SPS(B)' if config.policy.startswith('scheduler') else ''}) ...", file=sys.stderr)
    engine = Engine(target, drafter, config)
    machine = describe_machine()
    total = 2 * sum(len(p) for p in prompts.values())
    print(f"running {total} requests ({FLAGS.requests_per_class} per class and arm) ...", file=sys.stderr)
    result = run_ab(engine, policy, prompts, tenant=FLAGS.tenant, max_new_tokens=FLAGS.max_new_tokens,
                    concurrency=FLAGS.concurrency)
    result.update(command=command_line(), machine=machine, target=target.source, drafter=drafter.source,
                  cost_table=dict(buckets=list(engine.cost_table.buckets),
                                  steps_per_s=list(engine.cost_table.steps_per_s)) if engine.cost_table else None)
    header = (f"`{result['command']}`\n\nMachine: {machine}. Target {target.source}; drafter {drafter.source}. "
              f"Policy {policy.source}, ${policy.cost_per_hour_usd:g}/h.\n")
    paths = write_ab(result, policy, FLAGS.output_dir, header)
    print(format_markdown(result, ab_tables(result, policy)))
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)


def run(argv: list[str]) -> None:
    _define_flags()
    run_command("ab", __name__, __doc__, body, argv)

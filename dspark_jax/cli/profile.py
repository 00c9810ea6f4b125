"""`dspark profile`: steps per second of the engine's real draft+verify step at every verification bucket on
this machine, and of the draft-free step (target alone) — the SPS(B) cost table the hardware-aware scheduler
uses. Prints the table, writes it as JSON (`--output`) and plots it (`--plot`)."""
from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from dspark_jax.cli.common import define_flag, define_serving_flags, load_target_and_drafter, run_command

FLAGS = flags.FLAGS


def _define_flags() -> None:
    define_serving_flags()
    define_flag("integer", "gamma", None, "Draft block size (default: the drafter's).", lower_bound=1)
    define_flag("integer", "slots", 8, "Concurrent request slots of the engine.", lower_bound=1)
    define_flag("integer", "max_len", 512, "Cache rows per slot.", lower_bound=16)
    define_flag("integer", "steps", 3, "Timed steps per bucket in each pass.", lower_bound=1)
    define_flag("integer", "passes", 3, "Interleaved timing passes (each: the draft-free step, every bucket, the "
                "draft-free step again); steps/s is the median over every timed step.", lower_bound=1)
    define_flag("string", "output", "benchmarks/results/cost_table.json", "Cost table JSON to write.")
    define_flag("string", "plot", None, "PNG of steps/s and tokens/s vs bucket (default: next to --output).")


def body() -> None:
    from dspark_jax.serving.engine import Engine, EngineConfig
    from dspark_jax.serving.plots import plot_cost_table

    target, drafter = load_target_and_drafter(FLAGS.target, FLAGS.drafter, FLAGS.gamma)
    print("compiling every bucket and profiling ...", file=sys.stderr)
    engine = Engine(target, drafter, EngineConfig(slots=FLAGS.slots, max_len=FLAGS.max_len, policy="scheduler",
                                                     attn_impl=FLAGS.attn_impl, profile_steps=FLAGS.steps,
                                                     profile_passes=FLAGS.passes))
    table = engine.cost_table
    print(f"machine: {table.machine}")
    print(f"{'tokens (bucket)':>16} {'steps/s':>9} {'tokens/s':>10}")
    for b, s in zip(table.buckets, table.steps_per_s):
        print(f"{b:>16} {s:>9.2f} {b * s:>10.1f}")
    print(f"{'no drafter':>16} {table.plain_steps_per_s:>9.2f} {FLAGS.slots * table.plain_steps_per_s:>10.1f}"
          "   (target alone, one token per slot: the scheduler's plain fallback)")
    out = table.save(FLAGS.output)
    plot = Path(FLAGS.plot) if FLAGS.plot else out.with_suffix(".png")
    plot_cost_table(table, plot)
    print(f"wrote {out} and {plot}", file=sys.stderr)


def run(argv: list[str]) -> None:
    _define_flags()
    run_command("profile", __name__, __doc__, body, argv)

"""`dspark` entry point: the first argument names a command; each command module defines its flags."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": ("dspark_jax.cli.generate", "Generate completions: plain autoregressive or speculative with a drafter."),
    "prepare-data": ("dspark_jax.cli.prepare_data", "Regenerate training responses and build the target feature cache."),
    "train": ("dspark_jax.cli.train", "Train a drafter (DSpark / DFlash / Eagle3) against the frozen target from a target cache."),
    "profile": ("dspark_jax.cli.profile", "Measure steps/s of the draft+verify step per verification bucket (SPS cost table)."),
    "serve": ("dspark_jax.cli.serve", "OpenAI-compatible HTTP server (completions, chat, streaming) with governance."),
    "serve-bench": ("dspark_jax.cli.serve_bench", "Closed-loop load benchmark of the serving engine across policies and concurrency."),
    "ab": ("dspark_jax.cli.ab", "A/B test of speculation per workload class: baseline vs policy, cost and latency table."),
    "report": ("dspark_jax.cli.report", "Tables and plots of a governance snapshot (usage, cost, rollbacks)."),
    "eval": ("dspark_jax.cli.eval", "Evaluate drafters on benchmark prompts: accept length, speed-up, confidence quality."),
    "calibrate": ("dspark_jax.cli.calibrate", "Calibrate a drafter's confidence head (Sequential Temperature Scaling)."),
}


def usage() -> str:
    lines = ["usage: dspark <command> [--flags]", "", "commands:"]
    lines += [f"  {name:<13} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "Run `dspark <command> --help` for the flags of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        print(f"dspark: error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[command][0])
    module.run([f"dspark {command}"] + argv[2:])


if __name__ == "__main__":
    main()

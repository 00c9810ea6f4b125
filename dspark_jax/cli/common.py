"""Helpers shared by CLI commands: help text, one-line errors, prompt files."""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags, logging

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, OSError)


def run_command(name: str, module_name: str, doc: str, body: Callable[[], None], argv: list[str]) -> None:
    """Parses flags for one command and runs `body`, turning user errors into one-line messages."""
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        print(f"usage: dspark {name} [--flags]\n\n{doc}\n")
        print(flags.FLAGS.module_help(module_name))
        sys.exit(0)

    def main(_argv):
        logging.set_verbosity(logging.WARNING)
        if len(_argv) > 1:
            raise app.UsageError(f"unexpected positional arguments: {' '.join(_argv[1:])}")
        try:
            body()
        except USER_ERRORS as e:
            print(f"dspark {name}: error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(main, argv=argv)


def read_prompts_file(path: str) -> list[str]:
    """First turn of each line of a jsonl file with `{"turns": [...]}` objects."""
    from dspark_jax.data import read_first_turns
    return read_first_turns(path)

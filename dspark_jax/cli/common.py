"""Helpers shared by CLI commands: help text, one-line errors, prompt files."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from absl import app, flags

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, OSError)


def run_command(name: str, module_name: str, doc: str, body: Callable[[], None], argv: list[str]) -> None:
    """Parses flags for one command and runs `body`, turning user errors into one-line messages."""
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        print(f"usage: dspark {name} [--flags]\n\n{doc}\n")
        print(flags.FLAGS.module_help(module_name))
        sys.exit(0)

    def main(_argv):
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
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        turns = obj.get("turns") if isinstance(obj, dict) else None
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise ValueError(f"{path}:{n}: expected an object with a non-empty 'turns' list of strings")
        prompts.append(turns[0])
    if not prompts:
        raise ValueError(f"prompts file is empty: {path}")
    return prompts

"""Helpers shared by CLI commands: help text, one-line errors, prompt files."""
from __future__ import annotations

import os
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


MESH_HELP = ("Device mesh, e.g. 'data=8' or 'data=2,model=4' (sizes multiply to the number of devices of all "
             "processes): weights are split by their logical axes (heads, MLP, vocabulary over 'model'), requests / "
             "training sequences over 'data'. Default: a single device.")
DISTRIBUTED_HELP = ("Multi-host run: call jax.distributed.initialize() before anything else (automatic when "
                    "JAX_COORDINATOR_ADDRESS is set); only process 0 prints and writes files. See launch/README.md.")


def setup_devices(mesh: str | None, distributed: bool):
    """Joins the multi-process runtime when asked (before any device is used), silences the stdout of
    processes other than 0, and returns the `--mesh` mesh (None: one device, as without the flag)."""
    from dspark_jax.parallel import initialize_distributed, is_primary, make_mesh, wants_distributed
    if wants_distributed(distributed):
        initialize_distributed()
        if not is_primary():
            sys.stdout = open(os.devnull, "w")
    return make_mesh(mesh) if mesh else None

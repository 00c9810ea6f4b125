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
        from dspark_jax.utils.compile_cache import enable_compilation_cache
        try:
            enable_compilation_cache()
            body()
        except USER_ERRORS as e:
            print(f"dspark {name}: error: {e}", file=sys.stderr)
            sys.exit(2)

    def parse_flags(args: list[str]) -> list[str]:
        try:
            return flags.FLAGS(args)
        except flags.Error as e:  # a bad flag value is bad input like any other: one line, exit status 2
            print(f"dspark {name}: error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(main, argv=argv, flags_parser=parse_flags)


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


def define_flag(kind: str, name: str, default, help_text: str, *, module_name: str | None = None,
                **kwargs) -> None:
    """Defines an absl flag unless a command imported earlier in this process already did (commands define
    their flags on first use so that shared names like --target never clash). The flag belongs to
    `module_name` (default: the caller's module), so `dspark <command> --help` lists it."""
    if name not in flags.FLAGS:
        module_name = module_name or sys._getframe(1).f_globals["__name__"]
        getattr(flags, f"DEFINE_{kind}")(name=name, default=default, help=help_text, module_name=module_name,
                                         **kwargs)


TARGET_HELP = ("Target model: 'gemma3-270m' (the embedded default), a .gguf file or a Hugging Face model directory "
               "(config.json + *.safetensors).")
SERVING_DRAFTER_HELP = ("Drafter: 'default+ngram' (the shipped drafter with prompt lookup: the hybrid, as the main "
                        "job; any trained drafter + 'ngram[:options]'), 'default' (the shipped drafter alone), 'ngram' "
                        "(prompt lookup alone), 'random:<dspark|dflash|eagle3>' or a drafter directory.")
ATTN_IMPLS = ["reference", "pallas", "interpret", "auto"]


KV_BUCKETS_HELP = ("Cache lengths the engine's step is compiled for: comma-separated, ascending, the last = "
                   "--max_len, or 'auto' (powers of two from 128 below --max_len, and --max_len); each step then "
                   "attends over the shortest that holds every active request. Default: --max_len alone (every "
                   "step attends over all rows; on a 2-core CPU a ladder did not pay for its compile time).")


def define_serving_flags(attn_impl: bool = True, kv_buckets: bool = False) -> None:
    """--target, --drafter (and --attn_impl, --kv_buckets) of the commands that run the serving engine."""
    caller = sys._getframe(1).f_globals["__name__"]
    define_flag("string", "target", "gemma3-270m", TARGET_HELP, module_name=caller)
    define_flag("string", "drafter", "default+ngram", SERVING_DRAFTER_HELP, module_name=caller)
    if attn_impl:
        define_flag("enum", "attn_impl", "reference", ATTN_IMPL_HELP, enum_values=ATTN_IMPLS, module_name=caller)
    if kv_buckets:
        define_flag("string", "kv_buckets", "", KV_BUCKETS_HELP, module_name=caller)


def positive_ints(text: str, name: str) -> list[int]:
    """'1,4,8' → [1, 4, 8]; ValueError naming --`name` for anything else (empty, an empty item, anything but
    decimal digits, values < 1)."""
    items = [x.strip() for x in text.split(",")]
    if not any(items):
        raise ValueError(f"--{name} is empty: give comma-separated positive integers")
    if not all(x.isdigit() and x.isascii() for x in items):
        raise ValueError(f"--{name} must be comma-separated positive integers, got {text!r}")
    values = [int(x) for x in items]
    if min(values) < 1:
        raise ValueError(f"--{name} needs positive integers, got {text!r}")
    return values


def kv_buckets_flag(text: str, max_len: int) -> tuple[int, ...] | None:
    """--kv_buckets as EngineConfig.kv_buckets: None (max_len alone) when empty, the ladder for 'auto' (any case);
    ValueError naming the flags unless ascending and ending at --max_len."""
    from dspark_jax.serving.engine_config import kv_buckets
    text = text.strip()
    if text.lower() == "auto":
        return kv_buckets(max_len)
    if not text:
        return None
    values = positive_ints(text, "kv_buckets")
    if values != sorted(set(values)) or values[-1] != max_len:
        raise ValueError(f"--kv_buckets must be ascending cache lengths ending at --max_len ({max_len}), or 'auto'; "
                         f"got {text!r}")
    return tuple(values)


def load_target_and_drafter(target_spec: str, drafter_spec: str, gamma: int | None = None):
    """The target and a drafter ('default', 'ngram', '<drafter>+ngram', 'random:<algorithm>' or a directory) for
    serving commands."""
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    from dspark_jax.target import load_target
    print(f"loading target {target_spec} ...", file=sys.stderr)
    target = load_target(target_spec)
    algorithm = "dspark"
    if drafter_spec.startswith("random:"):
        drafter_spec, algorithm = "random", drafter_spec.split(":", 1)[1]
    drafter = load_drafter(drafter_spec, target, algorithm=algorithm, gamma=gamma or 7, draft_vocab_size=16384)
    if drafter is None:
        raise ValueError("serving needs a drafter ('default', 'ngram', 'default+ngram', 'random:<algorithm>' or a "
                         "drafter directory)")
    if gamma:
        drafter = with_block_size(drafter, gamma)
    print(f"drafter: {drafter.source} ({drafter.config.algorithm}, gamma={drafter.config.block_size})",
          file=sys.stderr)
    return target, drafter


ATTN_IMPL_HELP = ("Attention implementation: 'reference' (pure JAX), 'pallas' (Pallas kernels: Triton on GPU, Mosaic "
                  "on TPU, interpret mode on CPU), 'interpret' (kernels in Pallas interpret mode) or 'auto' (kernels "
                  "on GPU/TPU, reference on CPU). The Triton kernels were checked and timed on one H200 GPU; the "
                  "Mosaic TPU kernels in interpret mode only.")

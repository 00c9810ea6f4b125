"""`dspark train`: train a drafter against the frozen target from a prepared target cache."""
from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

from absl import flags

from dspark_jax.cli.common import DISTRIBUTED_HELP, MESH_HELP, run_command, setup_devices

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Python file defining CONFIG, a TrainConfig (see configs/train/).")
flags.DEFINE_multi_string("override", [], "Override a config field: --override=epochs=2 (repeatable; Python "
                          "literals: numbers, tuples, None).")
flags.DEFINE_string("data_dir", None, "Output directory of `dspark prepare-data` (its cache/ holds the target "
                    "cache).")
flags.DEFINE_string("workdir", None, "Run directory: orbax checkpoints (the run resumes from the latest), "
                    "metrics.jsonl, TensorBoard events, and the exported drafter in <workdir>/drafter.")
flags.DEFINE_string("target", "gemma3-270m", "Target model: 'gemma3-270m', a .gguf file or a HF directory.")
flags.DEFINE_string("mesh", None, MESH_HELP)
flags.DEFINE_bool("fsdp", False, "With --mesh: also split parameters (drafter and frozen target) over 'data' "
                  "along their embedding dimension (fully sharded data parallelism).")
flags.DEFINE_bool("distributed", False, DISTRIBUTED_HELP)
flags.DEFINE_integer("stop_after", None, "Stop after this many micro-steps (the run can be resumed later).")
flags.DEFINE_string("heldout_dir", None, "Output directory of `dspark prepare-data --heldout N` (same --layer_ids): "
                    "the drafter's teacher-forced quality on the target's outputs for held-out prompts (slot "
                    "accuracy, greedy and probabilistic tau) is logged every heldout_every steps. Several: a comma "
                    "list of [NAME=]DIR (e.g. 'runs/heldout,t1=runs/heldout_t1': greedy and T = 1 outputs); the "
                    "first unnamed one logs as heldout/, the others as heldout_NAME/ (NAME: the directory's name "
                    "where none is given).")


def heldout_dirs(value: str) -> dict[str, Path]:
    """--heldout_dir's comma list of [NAME=]DIR as {metric prefix: directory} (`Trainer`'s heldout names): the
    first unnamed entry is "heldout", the others "heldout_NAME" (NAME: the directory's name where none is
    given). Raises ValueError for an empty entry or name and a repeated name, FileNotFoundError for a directory
    without cache/."""
    out: dict[str, Path] = {}
    for i, entry in enumerate(e.strip() for e in value.split(",") if value.strip()):
        name, sep, directory = entry.partition("=") if "=" in entry else ("", "", entry)
        name, directory = name.strip(), directory.strip()
        if not directory or (sep and not name):
            raise ValueError(f"--heldout_dir: empty name or directory in {entry!r} (expected [NAME=]DIR)")
        if not name and i == 0:
            key = "heldout"
        else:
            key = f"heldout_{name or Path(directory).name}"
        if "/" in key or key in out:
            raise ValueError(f"--heldout_dir: held-out name {key!r} is repeated or contains '/'; name each "
                             f"cache (NAME=DIR)")
        if not (Path(directory) / "cache").is_dir():
            raise FileNotFoundError(f"{directory} has no cache/: run `dspark prepare-data --heldout N "
                                    f"--output_dir {directory}` with the same --layer_ids first")
        out[key] = Path(directory)
    return out


def load_train_config(path: str, overrides: list[str]):
    """The config file's CONFIG with --override field=value changes applied."""
    from dspark_jax.training.config_file import load_config_file
    config = load_config_file(path)
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad --override {item!r}: expected field=value with a field of TrainConfig")
        try:
            changes[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            changes[key] = value
    return dataclasses.replace(config, **changes)


def body() -> None:
    from dspark_jax.drafters.checkpoint import save_drafter
    from dspark_jax.target import load_target
    from dspark_jax.training.target_cache import TargetCache
    from dspark_jax.training.trainer import Trainer

    for name in ("config", "data_dir", "workdir"):
        if not getattr(FLAGS, name):
            raise ValueError(f"--{name} is required")
    config = load_train_config(FLAGS.config, FLAGS.override)
    heldout_paths = heldout_dirs(FLAGS.heldout_dir or "")  # bad input fails before the target loads
    if FLAGS.fsdp and not FLAGS.mesh:
        raise ValueError("--fsdp needs a --mesh with a 'data' axis, e.g. --mesh data=8")
    mesh = setup_devices(FLAGS.mesh, FLAGS.distributed)
    print(f"loading target {FLAGS.target} ...", file=sys.stderr)
    from dspark_jax.parallel import make_rules
    target = load_target(FLAGS.target, mesh=mesh, rules=make_rules(FLAGS.fsdp))  # straight onto the mesh
    dc = config.drafter_config(target.config)
    data = Path(FLAGS.data_dir)
    if (data / "cache").is_dir():
        cache = TargetCache.open(data / "cache", target_config=target.config, layer_ids=dc.target_layer_ids)
    elif (data / "sequences").is_dir():  # prepare-data --online: the trainer runs the target in its step
        cache = TargetCache.open(data / "sequences", target_config=target.config)
    else:
        raise FileNotFoundError(f"{data} has neither cache/ nor sequences/: run `dspark prepare-data` first")
    heldout = {name: TargetCache.open(d / "cache", target_config=target.config, layer_ids=dc.target_layer_ids)
               for name, d in heldout_paths.items()}
    trainer = Trainer(target, cache, config, FLAGS.workdir, mesh=mesh, fsdp=FLAGS.fsdp, heldout=heldout)
    print(f"training {config.algorithm} drafter: {len(cache)} sequences, {trainer.total_steps} optimizer steps "
          f"({trainer.steps_per_epoch} micro-steps per epoch)", file=sys.stderr)
    drafter = trainer.run(stop_at_micro_step=FLAGS.stop_after)
    if trainer.micro_step >= trainer.total_micro:
        from flax import nnx

        from dspark_jax.parallel import is_primary, to_host
        state = to_host(drafter.state)  # gathered from every process on a multi-host run
        if is_primary():
            out = save_drafter(nnx.merge(drafter.graphdef, state), Path(FLAGS.workdir) / "drafter",
                               extra=dict(train_config=dataclasses.asdict(config), micro_steps=trainer.micro_step))
            print(f"exported drafter to {out}")
    else:
        print(f"stopped at micro-step {trainer.micro_step}/{trainer.total_micro}; rerun to resume")


def run(argv: list[str]) -> None:
    run_command("train", __name__, __doc__, body, argv)

"""`dspark prepare-data`: regenerate training responses with the target, then cache its features.

Steps (each resumable: rerun the same command after an interruption):
  1. responses of the target to the training prompts -> <output_dir>/responses.jsonl
  2. training sequences (prompt + response, loss on the response)
  3. the target feature cache -> <output_dir>/cache/ (or, with --online, tokens and loss masks only ->
     <output_dir>/sequences/, the trainer then runs the target itself)
Data volume is printed at the end and written to <output_dir>/data_stats.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Sequence

from absl import flags

from dspark_jax.cli.common import TARGET_HELP, read_prompts_file, run_command

FLAGS = flags.FLAGS
SETTINGS_NAME = "prepare_settings.json"
STATS_NAME = "data_stats.json"


def _define_flags() -> None:
    """Defined on first use (not at import), so importing this module never clashes with other commands'
    flags of the same names."""
    if "output_dir" in FLAGS and "online" in FLAGS:
        return
    from dspark_jax.training.responses import RegenConfig
    d = RegenConfig()
    flags.DEFINE_string("target", "gemma3-270m", TARGET_HELP)
    flags.DEFINE_string("output_dir", None, "Directory for responses.jsonl, the cache and data_stats.json "
                        "(required). Rerunning with the same directory resumes.")
    flags.DEFINE_string("mix", None, "Training prompts per source, e.g. 'gsm8k=500,livecodebench=350,"
                        "arena-hard-v2=350' (default: that mix). Sources: gsm8k (without its first 200 "
                        "evaluation lines), livecodebench, arena-hard-v2.")
    flags.DEFINE_string("prompts_file", None, 'Instead of --mix: a JSONL file of {"turns": [...]} objects whose '
                        "first turns are the training prompts.")
    flags.DEFINE_integer("heldout", None, "Instead of training prompts: the first N prompts of each held-out "
                         "evaluation set (gsm8k's first 200 lines, humaneval, mbpp, mt-bench) — data for the "
                         "trainer's held-out quality (`dspark train --heldout_dir`), never trained on.",
                         lower_bound=1)
    flags.DEFINE_integer("seed", d.seed, "Seed of the prompt sample and of response sampling.")
    flags.DEFINE_integer("max_new_tokens", d.max_new_tokens, "Maximum response tokens per prompt.", lower_bound=1)
    flags.DEFINE_integer("max_prompt_tokens", d.max_prompt_tokens, "Prompts are cut to this many tokens (the "
                         "answer cue is kept).", lower_bound=1)
    flags.DEFINE_float("temperature", d.temperature, "Sampling temperature of the responses (0 = greedy).",
                       lower_bound=0.0)
    flags.DEFINE_integer("top_k", d.top_k, "Top-k filter of response sampling (0 = off).", lower_bound=0)
    flags.DEFINE_float("top_p", d.top_p, "Nucleus (top-p) filter of response sampling in (0, 1] (1 = off).")
    flags.DEFINE_integer("batch_size", d.batch_size, "Prompts generated together in one batch.", lower_bound=1)
    flags.DEFINE_string("layer_ids", None, "Comma-separated target layers to cache, e.g. '1,4,8,12,15' (-1 = "
                        "embedding output). Default: 5 ids spread over [1, L-3] (DFlash's rule).")
    flags.DEFINE_string("cache_dtype", "bfloat16", "Dtype of cached hidden states: bfloat16 or float32 "
                        "(float16 overflows on Gemma's hidden states).")
    flags.DEFINE_integer("cache_batch_size", 8, "Sequences run through the target together when building the "
                         "cache.", lower_bound=1)
    flags.DEFINE_integer("shard_max_tokens", 2_000_000, "Tokens per cache shard at most.", lower_bound=1)
    flags.DEFINE_integer("min_loss_tokens", 14, "Drop samples with fewer supervised (response) tokens.",
                         lower_bound=0)
    flags.DEFINE_integer("max_length", 4096, "Training sequences are cut to this many tokens.", lower_bound=1)
    flags.DEFINE_bool("regenerate", True, "Regenerate (or resume regenerating) the responses. --noregenerate builds "
                      "the training data from every response already in <output_dir>/responses.jsonl, e.g. after "
                      "stopping a long regeneration early or from the shipped responses (the prompt flags are then not "
                      "used).")
    flags.DEFINE_list("responses", None, "With --noregenerate: the response files to build the training data "
                      "from instead of <output_dir>/responses.jsonl, in this order — regenerate's JSONL, gzipped when "
                      "the name ends in .gz (e.g. the shipped dspark_jax/data/train/gemma3_270m_greedy_responses.jsonl.gz). Several files give "
                      "several responses per prompt (greedy and sampled); within one file the first response of a "
                      "prompt index counts.")
    flags.DEFINE_bool("online", False, "Regenerate responses and write the training sequences only (no feature "
                      "cache); the trainer computes target features in its step.")
    flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                      "Target parameter/compute dtype; auto = float32 on CPU, bfloat16 on GPU/TPU.")


def parse_mix(text: str) -> dict[str, int]:
    """'gsm8k=500,livecodebench=350' -> {'gsm8k': 500, 'livecodebench': 350}."""
    mix = {}
    for part in text.split(","):
        name, sep, count = part.strip().partition("=")
        name = name.strip()
        try:
            n = int(count)
        except ValueError:
            n = -1
        if not sep or not name or n < 1:
            raise ValueError(f"--mix: expected 'name=count' items with counts >= 1, got {part.strip()!r}")
        if name in mix:
            raise ValueError(f"--mix: {name} given twice")
        mix[name] = n
    return mix


HELDOUT_SETS = ("gsm8k", "humaneval", "mbpp", "mt-bench")


def heldout_prompts(per_set: int) -> list[str]:
    """The first `per_set` prompts of each held-out evaluation set (gsm8k: of its first 200 lines)."""
    from dspark_jax.data import N_GSM8K_EVAL, eval_dataset_path, read_first_turns
    if per_set > N_GSM8K_EVAL:
        raise ValueError(f"--heldout: at most {N_GSM8K_EVAL} prompts per set, got {per_set}")
    return [p for name in HELDOUT_SETS for p in read_first_turns(eval_dataset_path(name))[:per_set]]


def parse_layer_ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--layer_ids: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--layer_ids is empty")
    return ids


def check_response_files(files: Sequence[str | Path], regenerate: bool = False) -> list[Path]:
    """The response files of `--responses` as paths; raises ValueError with `regenerate` (the files are read only
    with --noregenerate), for an empty entry or a file given twice, FileNotFoundError for one that is missing or
    not a file."""
    if regenerate:
        raise ValueError("--responses is read only with --noregenerate (regeneration writes "
                         "<output_dir>/responses.jsonl)")
    paths = []
    for f in files:
        if not str(f).strip():
            raise ValueError(f"--responses: an empty entry in {','.join(map(str, files))!r}")
        path = Path(f)
        if not path.is_file():
            what = "is a directory, not a" if path.is_dir() else "no"
            raise FileNotFoundError(f"--responses: {what} responses file {path}")
        if any(path.resolve() == p.resolve() for p in paths):
            raise ValueError(f"--responses: {path} given twice (its responses would count twice)")
        paths.append(path)
    return paths


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Refuses to resume into a directory prepared with other prompts or response settings."""
    path = out_dir / SETTINGS_NAME
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = None
        if old != settings:
            diff = sorted(k for k in settings if not isinstance(old, dict) or old.get(k) != settings[k])
            raise ValueError(f"{out_dir} was prepared with other settings ({', '.join(diff)} differ); use another "
                             f"--output_dir")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=2), encoding="utf-8")
        tmp.replace(path)


def prepare(target, prompts: list[str], output_dir, regen, *, layer_ids=None, cache_dtype: str = "bfloat16",
            min_loss_tokens: int = 14, max_length: int | None = 4096, online: bool = False,
            cache_batch_size: int = 8, shard_max_tokens: int = 2_000_000, prompt_source: str = "",
            progress: bool = True, regenerate_responses: bool = True,
            response_files: Sequence[str | Path] | None = None) -> dict:
    """The whole pipeline (see the module docstring); returns the data statistics also written to
    <output_dir>/data_stats.json. `response_files` (only without `regenerate_responses`): the `regenerate` files
    (JSONL, or gzipped JSONL) read in this order instead of <output_dir>/responses.jsonl. Raises
    FileNotFoundError for a missing responses file, ValueError for bad input."""
    from dspark_jax.drafters.config import default_target_layer_ids
    from dspark_jax.training import cache_builder, cache_format
    from dspark_jax.data.responses import read_responses
    from dspark_jax.training.sequences import make_sequence
    from dspark_jax.training.responses import regenerate

    config = target.config
    if not prompts:
        raise ValueError("no training prompts")
    if regen.max_prompt_tokens + regen.max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"max_prompt_tokens + max_new_tokens = {regen.max_prompt_tokens + regen.max_new_tokens} "
                         f"exceeds the target's context of {config.max_position_embeddings} tokens")
    if not online:
        cache_dtype = cache_format.check_cache_dtype(cache_dtype)
        layer_ids = tuple(layer_ids) if layer_ids else default_target_layer_ids(config.num_layers)
        cache_builder.check_layer_ids(layer_ids, config)
    out_dir = Path(output_dir)
    responses = out_dir / "responses.jsonl"
    if response_files:
        response_files = check_response_files(response_files, regenerate_responses)
    if regenerate_responses:
        regen_settings = {k: v for k, v in dataclasses.asdict(regen).items() if k != "batch_size"}
        _check_settings(out_dir, {
            "target_fingerprint": cache_format.config_fingerprint(config),
            "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "num_prompts": len(prompts), "regen": regen_settings})
        regenerate(target, prompts, responses, regen)
        records = [r for r in read_responses(responses) if 0 <= r["index"] < len(prompts)]
        files = [responses]
    else:  # every response of the files: their indices refer to the prompt list that made them, not to `prompts`
        files = response_files or [responses]
        if not files[0].is_file():
            raise FileNotFoundError(f"--noregenerate: no {files[0]} to build the training data from")
        regen_settings = None
        prompt_source = f"responses file{'s' if len(files) > 1 else ''} {', '.join(map(str, files))} (--noregenerate)"
        records = [r for f in files for r in read_responses(f)]
    sequences, cut = [], 0
    for r in records:
        seq = make_sequence(r["prompt_ids"], r["response_ids"], max_length)
        if seq.num_loss_tokens >= max(min_loss_tokens, 1):
            sequences.append(seq)
        elif len(r["response_ids"]) >= max(min_loss_tokens, 1):
            cut += 1  # long enough, but max_length cut it (a long prompt)
    if not sequences:
        raise ValueError(f"no training sequences: {len(records)} responses, none with >= {min_loss_tokens} tokens"
                         + (f" ({cut} of them cut by --max_length {max_length})" if cut else ""))

    meta = {"prompt_source": prompt_source, "min_loss_tokens": min_loss_tokens, "max_length": max_length,
            "responses": str(files[0].resolve()) if len(files) == 1 else [str(f.resolve()) for f in files],
            "regen": regen_settings}
    if online:
        cache_dir = cache_builder.build_sequence_cache(target, sequences, out_dir / "sequences", progress=progress,
                                            shard_max_tokens=shard_max_tokens, prompt_format=regen.template,
                                            metadata=meta)
    else:
        cache_dir = cache_builder.build_target_cache(target, sequences, out_dir / "cache", layer_ids, dtype=cache_dtype,
                                          batch_size=cache_batch_size, shard_max_tokens=shard_max_tokens,
                                          progress=progress, prompt_format=regen.template, metadata=meta)

    response_tokens = sum(s.num_loss_tokens for s in sequences)
    total_tokens = sum(len(s) for s in sequences)
    stats = {
        "prompts": len(prompts) if regenerate_responses else None,
        "prompt_source": prompt_source,
        "responses": len(records),
        "failed_prompts": len(prompts) - len(records) if regenerate_responses else None,
        "stopped_responses": sum(bool(r.get("stopped")) for r in records),
        "sequences": len(sequences),
        "dropped_short": len(records) - len(sequences),
        "dropped_by_max_length": cut,
        "min_loss_tokens": min_loss_tokens,
        "max_length": max_length,
        "response_tokens": int(response_tokens),
        "prompt_tokens": int(total_tokens - response_tokens),
        "total_tokens": int(total_tokens),
        "mean_response_tokens": response_tokens / len(sequences),
        "mode": "online" if online else "offline",
        "cache_dir": str(cache_dir),
        "cache_bytes": sum(f.stat().st_size for f in Path(cache_dir).rglob("*") if f.is_file()),
        "layer_ids": None if online else list(layer_ids),
        "cache_dtype": None if online else cache_dtype,
        "target": config.name,
        "target_source": str(getattr(target, "source", "")),
    }
    tmp = out_dir / (STATS_NAME + ".tmp")
    tmp.write_text(json.dumps(stats, indent=2), encoding="utf-8")
    tmp.replace(out_dir / STATS_NAME)
    failed = (f" ({stats['failed_prompts']} prompts without a response: not generated yet (--noregenerate) or failed, "
              f"see responses.errors.jsonl)" if stats["failed_prompts"] else "")
    print(f"prompts: {stats['prompts'] or 'not used (--noregenerate)'}; responses: {stats['responses']:,}{failed}, "
          f"{stats['stopped_responses']:,} ended with a stop token")
    by_length = f", {cut:,} of them because --max_length {max_length} cut the response" if cut else ""
    print(f"sequences: {stats['sequences']:,} ({stats['dropped_short']:,} dropped with < {min_loss_tokens} "
          f"response tokens{by_length})")
    print(f"response tokens: {stats['response_tokens']:,} (mean {stats['mean_response_tokens']:.1f}); total tokens: "
          f"{stats['total_tokens']:,} ({stats['prompt_tokens']:,} prompt)")
    print(f"{'sequences' if online else 'cache'}: {cache_dir} ({cache_format.format_bytes(stats['cache_bytes'])}); "
          f"stats: {out_dir / STATS_NAME}")
    return stats


def body() -> None:
    import jax.numpy as jnp

    from dspark_jax.data import DEFAULT_TRAINING_MIX, select_training_prompts
    from dspark_jax.sampling import validate_sampling
    from dspark_jax.target import load_target
    from dspark_jax.training import cache_format
    from dspark_jax.training.responses import RegenConfig

    if not FLAGS.output_dir:
        raise ValueError("--output_dir is required")
    if sum(bool(x) for x in (FLAGS.mix, FLAGS.prompts_file, FLAGS.heldout)) > 1:
        raise ValueError("give one of --mix, --prompts_file and --heldout")
    validate_sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    layer_ids = parse_layer_ids(FLAGS.layer_ids) if FLAGS.layer_ids else None
    if not FLAGS.online:
        cache_format.check_cache_dtype(FLAGS.cache_dtype)
    if FLAGS.prompts_file:
        prompts, source = read_prompts_file(FLAGS.prompts_file), f"file:{FLAGS.prompts_file}"
    elif FLAGS.heldout:
        prompts, source = heldout_prompts(FLAGS.heldout), f"heldout:{FLAGS.heldout}"
    else:
        mix = parse_mix(FLAGS.mix) if FLAGS.mix else DEFAULT_TRAINING_MIX
        prompts = select_training_prompts(mix, seed=FLAGS.seed)
        source = "mix:" + ",".join(f"{k}={v}" for k, v in mix.items())
    regen = RegenConfig(max_new_tokens=FLAGS.max_new_tokens, max_prompt_tokens=FLAGS.max_prompt_tokens,
                        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                        batch_size=FLAGS.batch_size, seed=FLAGS.seed)
    if FLAGS.responses is not None:  # before the target loads: a typo fails in a second
        check_response_files(FLAGS.responses or [""], FLAGS.regenerate)
    print(f"loading target {FLAGS.target} ...", file=sys.stderr)
    target = load_target(FLAGS.target, dtype=None if FLAGS.dtype == "auto" else getattr(jnp, FLAGS.dtype))
    prepare(target, prompts, FLAGS.output_dir, regen, layer_ids=layer_ids, cache_dtype=FLAGS.cache_dtype,
            min_loss_tokens=FLAGS.min_loss_tokens, max_length=FLAGS.max_length, online=FLAGS.online,
            cache_batch_size=FLAGS.cache_batch_size, shard_max_tokens=FLAGS.shard_max_tokens,
            prompt_source=source, regenerate_responses=FLAGS.regenerate, response_files=FLAGS.responses)


def run(argv: list[str]) -> None:
    _define_flags()
    run_command("prepare-data", __name__, __doc__, body, argv)

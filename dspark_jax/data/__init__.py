"""Data files shipped with the package (benchmark prompts)."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

EVAL_DATASETS = ("gsm8k", "math500", "aime25", "humaneval", "mbpp", "mt-bench", "livecodebench", "arena-hard-v2")


def eval_dataset_path(name: str) -> Path:
    """Path of a shipped benchmark prompt file by name (e.g. "mt-bench")."""
    if name not in EVAL_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; shipped: {', '.join(EVAL_DATASETS)}")
    return Path(str(files("dspark_jax.data").joinpath("eval", f"{name}.jsonl")))


# Evaluation prompts are never trained on: the first N_GSM8K_EVAL lines of gsm8k and every line of these files.
N_GSM8K_EVAL = 200
EVAL_ONLY = ("math500", "aime25", "humaneval", "mbpp", "mt-bench")


def read_first_turns(path: str | Path) -> list[str]:
    """First turn of each `{"turns": [...]}` line of a JSONL file, with clear errors on bad lines."""
    import json
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"prompts file is a directory: {path}")
    if not p.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    prompts = []
    # split on "\n" only: str.splitlines() would also split on U+2028 inside JSON strings
    for n, line in enumerate(text.split("\n"), 1):
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


def training_prompts() -> list[str]:
    """Prompts that may be trained on (and used to pick a draft vocabulary): gsm8k after the first 200
    lines, livecodebench, arena-hard-v2. Never the evaluation prompts."""
    gsm = read_first_turns(eval_dataset_path("gsm8k"))[N_GSM8K_EVAL:]
    return gsm + read_first_turns(eval_dataset_path("livecodebench")) + read_first_turns(eval_dataset_path("arena-hard-v2"))


DEFAULT_TRAINING_MIX = {"gsm8k": 500, "livecodebench": 350, "arena-hard-v2": 350}


def select_training_prompts(mix: dict[str, int] | None = None, seed: int = 0) -> list[str]:
    """A seeded sample of training prompts per source (gsm8k never includes its first 200 evaluation lines)."""
    import random
    mix = DEFAULT_TRAINING_MIX if mix is None else mix
    rng = random.Random(seed)
    out = []
    for name, count in mix.items():
        if name in EVAL_ONLY:
            raise ValueError(f"{name} is an evaluation dataset and is never trained on")
        pool = read_first_turns(eval_dataset_path(name))
        if name == "gsm8k":
            pool = pool[N_GSM8K_EVAL:]
        if count > len(pool):
            raise ValueError(f"{name} has {len(pool)} training prompts, {count} requested")
        out += rng.sample(pool, count)
    return out

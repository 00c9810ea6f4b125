"""Benchmark prompt sets for evaluation (by shipped name or by path) and held-out prompts for calibration.

Shipped evaluation sets and their domains (paper Table 1): math = gsm8k (its first 200 lines only: the rest
may be trained on), math500, aime25; code = humaneval, mbpp; chat = mt-bench (first turn). livecodebench and
arena-hard-v2 are training prompts in this project and are refused. Any `{"turns": [...]}` JSONL file can be
given by path (domain "other"). Prompts are used in the training format (`PROMPT_FORMAT`) because the
default target is a base model.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Callable

from dspark_jax.data import (DEFAULT_TRAINING_MIX, EVAL_DATASETS, N_GSM8K_EVAL, eval_dataset_path, read_first_turns,
                             select_training_prompts)
from dspark_jax.training.responses import format_prompt

DOMAINS = {"gsm8k": "math", "math500": "math", "aime25": "math", "humaneval": "code", "mbpp": "code",
           "mt-bench": "chat"}
DOMAIN_ORDER = ("math", "code", "chat", "other")
DEFAULT_DATASETS = tuple(DOMAINS)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    domain: str
    prompts: tuple[str, ...]  # formatted for the target, in file order
    source: str


def load_benchmark(spec: str, limit: int | None = None, raw: bool = False, offset: int = 0) -> Benchmark:
    """A shipped evaluation set by name, or a JSONL file by path: `limit` prompts (all if None) from prompt
    `offset` on (0-based, file order). Raises ValueError for a bad limit or offset, or a set with no prompt past
    `offset`."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if spec in DOMAINS:
        path, name, domain = eval_dataset_path(spec), spec, DOMAINS[spec]
        prompts = read_first_turns(path)
        if spec == "gsm8k":
            prompts = prompts[:N_GSM8K_EVAL]
    elif spec in EVAL_DATASETS:
        raise ValueError(f"{spec} holds training prompts in this project, not evaluation prompts; evaluation sets: "
                         f"{', '.join(DOMAINS)} (or a JSONL file by path)")
    elif spec.endswith(".jsonl") or "/" in spec or Path(spec).exists():
        path, name, domain = Path(spec).expanduser(), Path(spec).stem, "other"
        prompts = read_first_turns(path)
    else:
        raise ValueError(f"unknown dataset {spec!r}; evaluation sets: {', '.join(DOMAINS)} (or a JSONL file by path)")
    if offset >= len(prompts):
        raise ValueError(f"{name} has {len(prompts)} prompts: none from offset {offset} on")
    prompts = prompts[offset:offset + limit] if limit else prompts[offset:]
    return Benchmark(name=name, domain=domain, prompts=tuple(p if raw else format_prompt(p) for p in prompts),
                     source=str(path))


def load_benchmarks(specs: list[str], limit: int | None = None, raw: bool = False,
                    offset: int = 0) -> list[Benchmark]:
    """Several sets (`load_benchmark`'s limit, raw and offset for each); duplicate names are an error."""
    out = [load_benchmark(s, limit, raw, offset) for s in specs]
    names = [b.name for b in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"dataset given twice: {', '.join(dup)}")
    return out


def heldout_prompts(count: int, seed: int = 0, raw: bool = False,
                    keep: Callable[[str], bool] | None = None) -> list[str]:
    """`count` calibration prompts from the training distribution that were never trained on nor evaluated:
    the sources of the default training mix (gsm8k after its first 200 lines, livecodebench, arena-hard-v2)
    minus the prompts `dspark prepare-data` selects by default (`select_training_prompts()`, seed 0), drawn
    round-robin over the sources with `random.Random(seed)`; `keep` (on the formatted prompt, e.g. a length
    limit) skips prompts."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    trained = set(select_training_prompts())
    rng = random.Random(seed)
    pools = []
    for name in DEFAULT_TRAINING_MIX:
        pool = read_first_turns(eval_dataset_path(name))
        pool = [p for p in (pool[N_GSM8K_EVAL:] if name == "gsm8k" else pool) if p not in trained]
        rng.shuffle(pool)
        pools.append(pool)
    out = []
    while len(out) < count and any(pools):
        for pool in pools:
            if pool and len(out) < count:
                prompt = pool.pop()
                prompt = prompt if raw else format_prompt(prompt)
                if keep is None or keep(prompt):
                    out.append(prompt)
    if len(out) < count:
        raise ValueError(f"only {len(out)} held-out prompts qualify, {count} requested")
    return out


TAIL_SETS = ("humaneval", "mbpp", "mt-bench")  # evaluation sets whose domains the training mix does not cover well


def eval_tail_prompts(per_set: int, datasets: tuple[str, ...] = TAIL_SETS, raw: bool = False,
                      keep: Callable[[str], bool] | None = None) -> list[str]:
    """Calibration prompts from the evaluation sets' own domains: the last `per_set` prompts of each set in
    `datasets` that pass `keep` (on the formatted prompt), interleaved set by set. Never evaluated by
    `dspark eval --limit N` when every set holds at least N + per_set prompts (humaneval 164, mbpp 257, mt-bench
    80: per_set 32 leaves --limit 48 disjoint); an evaluation of whole sets overlaps them. Raises ValueError for
    a set that is not an evaluation set or holds fewer qualifying prompts."""
    if per_set < 1:
        raise ValueError(f"per_set must be >= 1, got {per_set}")
    columns = []
    for name in datasets:
        pairs = [(p, format_prompt(p)) for p in load_benchmark(name, raw=True).prompts]
        pairs = [pair for pair in pairs if keep is None or keep(pair[1])]
        if len(pairs) < per_set:
            raise ValueError(f"{name}: only {len(pairs)} prompts qualify, {per_set} requested")
        columns.append([pair[0 if raw else 1] for pair in pairs[-per_set:]])
    return [p for row in zip(*columns) for p in row]

"""Reading `training.responses.regenerate` files: JSONL records {"index", "prompt_ids", "response_ids", …}, gzipped
or not — the shipped training responses (`dspark_jax/data/train/`) that training sequences and the corpus lookup's
table (`drafters.corpus`) are made of."""
from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from pathlib import Path


def read_responses(path: str | os.PathLike) -> list[dict]:
    """The records of a `regenerate` JSONL file (gzipped when its name ends in .gz), sorted by prompt index (first
    record wins for an index).

    Lines that are not valid JSON are skipped with a warning (an interrupted `regenerate` can leave a torn line).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"responses file not found: {path}")
    try:
        text = (gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:  # EOFError: a truncated gzip
        raise ValueError(f"{path}: not a {'gzipped ' if p.suffix == '.gz' else ''}UTF-8 JSONL file ({e})") from None
    records: dict[int, dict] = {}
    torn = 0
    # split on "\n" only: str.splitlines() would also split on U+2028 inside JSON strings
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        ok = (isinstance(rec, dict) and isinstance(rec.get("index"), int)
              and all(isinstance(rec.get(k), list) for k in ("prompt_ids", "response_ids")))
        if not ok:
            raise ValueError(f"{path}:{n}: expected an object with 'index', 'prompt_ids' and 'response_ids'")
        if not rec["prompt_ids"]:
            raise ValueError(f"{path}:{n}: empty prompt_ids")
        records.setdefault(rec["index"], rec)
    if not records:
        raise ValueError(f"{path}: no responses in it ({torn} line(s) that are not valid JSON)" if torn else
                         f"{path}: no responses in it (empty)")
    if torn:
        logging.warning("%s: skipped %d line(s) that are not valid JSON (torn by an interrupted run?)", path, torn)
    return [records[i] for i in sorted(records)]

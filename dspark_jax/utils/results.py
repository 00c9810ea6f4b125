"""Writing benchmark results."""
from __future__ import annotations

import json
from pathlib import Path

from dspark_jax.utils.files import atomic_write_text


def write_result(path: str | Path, result: dict) -> Path:
    """Writes `result` as indented JSON (atomically, creating parent folders) and says where."""
    out = atomic_write_text(path, json.dumps(result, indent=2))
    print(f"wrote {out}")
    return out

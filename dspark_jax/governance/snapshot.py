"""Writing and reading governance snapshot files (JSON, written atomically)."""
from __future__ import annotations

import json
from pathlib import Path

from dspark_jax.utils.files import atomic_write_text

SNAPSHOT_SCHEMA = "dspark-governance-snapshot/1"
REQUIRED_KEYS = ("time", "totals", "by_class", "by_tenant", "groups", "classes", "switches", "quotas")


def write_snapshot(path: str | Path, snapshot: dict) -> Path:
    """Writes `snapshot` as JSON to `path` via a temporary file in the same directory and an atomic rename."""
    return atomic_write_text(path, json.dumps(snapshot, indent=1, allow_nan=False) + "\n")


def read_snapshot(path: str | Path) -> dict:
    """A snapshot written by `write_snapshot` (or served at /snapshot.json); clear errors for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"snapshot file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SNAPSHOT_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: not a governance snapshot (expected schema {SNAPSHOT_SCHEMA!r}, found {found!r})")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: incomplete governance snapshot, missing {', '.join(missing)}")
    return data

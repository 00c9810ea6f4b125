"""Writing result files atomically (a temporary in the same folder, then a rename: a reader or a crash never
sees half a file) — text, numpy arrays and PNG figures with matplotlib's Agg backend — and the user cache folder."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for the temporary only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """Checks before any work that a result file can be written at `path` (what `atomic_write_text` will do:
    missing parent folders are created): not a directory, its nearest existing ancestor a writable directory.
    Raises ValueError naming `flag` and the user's path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory: give a file path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {parent} is not writable")
    return path


def cache_dir() -> Path:
    """The user cache directory: `$DSPARK_CACHE_DIR`, default (also when it is set but empty: `Path("")` would be
    the working directory) ~/.cache/dspark_jax."""
    return Path(os.environ.get("DSPARK_CACHE_DIR") or Path.home() / ".cache" / "dspark_jax")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes `text` to `path` (creating parent folders) atomically."""
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def atomic_save_npz(path: str | Path, arrays: dict) -> Path:
    """Writes numpy arrays to an uncompressed .npz at `path` (creating parent folders) atomically."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
    return _atomic(path, write)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, dpi: int = 110, tight: bool = False) -> Path:
    """Saves `fig` as PNG to `path` atomically (creating parent folders) and closes it."""
    try:
        return _atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png",
                                                     bbox_inches="tight" if tight else None))
    finally:
        pyplot().close(fig)

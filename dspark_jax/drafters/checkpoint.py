"""Compact drafter files for shipping and loading: `drafter.safetensors` (every state leaf, parameters in
the chosen dtype) + `drafter.json` (drafter config, target identity, provenance).

Format 2 (written now): bfloat16 parameters are real BF16 safetensors tensors (any safetensors reader, e.g.
`safetensors.safe_open(..., framework="pt")`, loads them). Format 1 (read still): bfloat16 stored as uint16 bit
patterns under `<name>:bf16`.

Training checkpoints (optimizer state, resume) use orbax in `dspark_jax.training.trainer`; this format is
what a finished drafter is exported to and what `dspark generate --drafter=PATH` loads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from dspark_jax.drafters.config import DrafterConfig
from dspark_jax.drafters.registry import drafter_class
from dspark_jax.models.config import TransformerConfig
from dspark_jax.utils.bfloat16 import BFLOAT16, bits_to_float32, to_bfloat16

FORMAT_VERSION = 2
TEMPERATURES_TENSOR = "confidence/temperatures"
BIASES_TENSOR = "confidence/biases"
CALIBRATED_AT_TENSOR = "confidence/calibrated_at"  # [S] the sampling temperature of each calibration set
CALIBRATION_TENSORS = (TEMPERATURES_TENSOR, BIASES_TENSOR, CALIBRATED_AT_TENSOR)  # kept float32 in the file
READABLE_VERSIONS = (1, 2)
META_FILE, WEIGHTS_FILE = "drafter.json", "drafter.safetensors"


class DrafterFileError(ValueError):
    """A drafter file is missing, corrupted or belongs to another target."""


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
    return {"/".join(str(k) for k in path): np.asarray(v) for path, v in nnx.to_flat_state(state)}


def save_drafter(module, path: str | os.PathLike, *, dtype=jnp.bfloat16, extra: dict | None = None) -> Path:
    """Writes the drafter directory atomically (a temp dir renamed into place): `drafter.json` and
    `drafter.safetensors`, float weights in `dtype` (real BF16 tensors by default, readable by any safetensors
    tool; the confidence head's calibration tensors stay float32)."""
    path = Path(path)
    tensors = {}
    for name, arr in _flat(nnx.state(module)).items():
        if np.issubdtype(arr.dtype, np.floating) and name not in CALIBRATION_TENSORS:
            arr = to_bfloat16(arr) if dtype == jnp.bfloat16 else np.asarray(arr, np.float32)
        tensors[name] = np.array(arr, order="C")  # keeps 0-d arrays 0-d
    meta = dict(format_version=FORMAT_VERSION, drafter_config=dataclasses.asdict(module.config),
                target=dict(name=module.target_config.name, fingerprint=module.target_config.fingerprint(),
                            family=module.target_config.family, num_layers=module.target_config.num_layers,
                            hidden_size=module.target_config.hidden_size, vocab_size=module.target_config.vocab_size),
                **(extra or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    return _swap_into_place(_write_files(path, tensors, meta), path)


def _write_files(path: Path, tensors: dict, meta: dict) -> Path:
    """The drafter files in a new temporary directory next to `path`, readable by everyone like any exported
    file (mkdtemp and safetensors would leave them private to this user)."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp"))
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    for f in (tmp / WEIGHTS_FILE, tmp / META_FILE):
        f.chmod(0o644)
    tmp.chmod(0o755)
    return tmp


def is_drafter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(path: str | os.PathLike) -> dict:
    f = Path(path) / META_FILE
    if not f.is_file():
        raise DrafterFileError(f"{path}: missing {META_FILE}")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DrafterFileError(f"{f}: corrupted ({e.msg})") from None
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise DrafterFileError(f"{f}: unsupported drafter format version {meta.get('format_version')}")
    return meta


def load_drafter_module(path: str | os.PathLike, target: TransformerConfig, dtype=jnp.float32):
    """Rebuilds the saved drafter for `target`; a drafter trained for another target is a clear error."""
    meta = read_meta(path)
    want = meta["target"]
    if want["fingerprint"] != target.fingerprint():
        raise DrafterFileError(
            f"{path}: this drafter was trained for target {want['name']!r} ({want['family']}, {want['num_layers']} "
            f"layers, hidden {want['hidden_size']}, vocab {want['vocab_size']}), not for {target.name!r} "
            f"({target.family}, {target.num_layers} layers, hidden {target.hidden_size}, vocab {target.vocab_size})")
    cfg = dict(meta["drafter_config"])
    cfg["target_layer_ids"] = tuple(cfg["target_layer_ids"])
    config = DrafterConfig(**cfg)
    try:
        tensors = load_file(str(Path(path) / WEIGHTS_FILE))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise DrafterFileError(f"{path}/{WEIGHTS_FILE}: unreadable or truncated ({e})") from None
    decoded = {}
    for name, arr in tensors.items():
        if name.endswith(":bf16"):  # format 1: bfloat16 stored as uint16 bits under '<name>:bf16'
            name, arr = name[:-5], bits_to_float32(arr)
        decoded[name] = arr.astype(np.float32) if arr.dtype == BFLOAT16 else arr
    vocab_ids = decoded.get("draft_to_target") if config.draft_vocab_size else None
    abstract = nnx.eval_shape(lambda: drafter_class(config)(config, target, dtype=dtype, rngs=nnx.Rngs(0),
                                                            draft_vocab_ids=None if vocab_ids is None else
                                                            np.asarray(vocab_ids)))
    graphdef, state = nnx.split(abstract)
    flat, calibration = [], {}
    for path_, leaf in sorted(nnx.to_flat_state(state), key=lambda kv: kv[0][-1] == "temperatures"):
        name = "/".join(str(k) for k in path_)
        if name == BIASES_TENSOR and name not in decoded:  # drafter files from before the per-position bias
            decoded[name] = np.zeros(decoded.get(TEMPERATURES_TENSOR, np.zeros(leaf.shape)).shape, np.float32)
        if name == CALIBRATED_AT_TENSOR and name not in decoded:  # files from before calibration sets: one set
            decoded[name] = np.asarray([meta.get("calibration", {}).get("sampling_temperature", 0.0)], np.float32)
        if name not in decoded:
            raise DrafterFileError(f"{path}: missing tensor {name!r}")
        arr = decoded.pop(name)
        if name in CALIBRATION_TENSORS:
            calibration[name] = arr
        if arr.shape != leaf.shape and arr.size == 1 and leaf.size == 1:
            arr = arr.reshape(leaf.shape)  # safetensors stores scalars as [1]
        if name == TEMPERATURES_TENSOR:  # one set [G] or one per sampling temperature [S, G]: checked together
            _check_calibration_tensors(path, arr, calibration[BIASES_TENSOR], calibration[CALIBRATED_AT_TENSOR],
                                       leaf.shape[-1])
        if name not in CALIBRATION_TENSORS and arr.shape != leaf.shape:
            raise DrafterFileError(f"{path}: tensor {name!r} has shape {arr.shape}, expected {leaf.shape}")
        flat.append((path_, jnp.asarray(arr, dtype=leaf.dtype)))
    if decoded:
        raise DrafterFileError(f"{path}: unexpected tensors {sorted(decoded)[:5]}")
    new_state = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, new_state)


def checked_calibration(temperatures, biases, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(temperatures [G], biases [G]) as float32 (biases None: zeros); raises ValueError unless there are G
    positive finite temperatures and G finite biases."""
    temps = np.asarray(temperatures, np.float32)
    if temps.shape != (block_size,) or not (np.isfinite(temps) & (temps > 0)).all():
        raise ValueError(f"temperatures must be {block_size} positive finite numbers, got {temps.tolist()}")
    bias = np.zeros_like(temps) if biases is None else np.asarray(biases, np.float32)
    if bias.shape != temps.shape or not np.isfinite(bias).all():
        raise ValueError(f"biases must be {block_size} finite numbers, got {bias.tolist()}")
    return temps, bias


def _check_calibration_tensors(path, temps: np.ndarray, biases: np.ndarray, at: np.ndarray,
                               block_size: int) -> None:
    """A drafter file's confidence calibration: temperatures and biases [G] (one set) or [S, G] (S > 1 sets, one
    per sampling temperature) and calibrated_at [S] ascending; raises DrafterFileError otherwise."""
    if temps.shape != (block_size,) and not (temps.ndim == 2 and temps.shape[1] == block_size and temps.shape[0] > 1):
        raise DrafterFileError(f"{path}: tensor {TEMPERATURES_TENSOR!r} has shape {temps.shape}, expected "
                               f"({block_size},) or (sets, {block_size})")
    if biases.shape != temps.shape:
        raise DrafterFileError(f"{path}: tensor {BIASES_TENSOR!r} has shape {biases.shape}, expected {temps.shape} "
                               f"(as {TEMPERATURES_TENSOR!r})")
    if not (np.isfinite(temps).all() and (temps > 0).all() and np.isfinite(biases).all()):
        raise DrafterFileError(f"{path}: calibration temperatures must be positive and finite, biases finite")
    sets = 1 if temps.ndim == 1 else temps.shape[0]
    if at.shape != (sets,) or not np.isfinite(at).all() or (at < 0).any() or (np.diff(at) <= 0).any():
        raise DrafterFileError(f"{path}: tensor {CALIBRATED_AT_TENSOR!r} must hold {sets} ascending sampling "
                               f"temperatures >= 0 (one per calibration set), got {at.tolist()}")


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """One confidence-head calibration: temperatures [G] and biases [G] fitted at `sampling_temperature`, and
    the fit's record (drafter.json's `calibration` dict)."""
    sampling_temperature: float
    temperatures: np.ndarray
    biases: np.ndarray
    record: dict


def calibration_sets(path: str | os.PathLike) -> list[CalibrationSet]:
    """The calibration sets of a drafter directory, ascending in sampling temperature; [] for a head never
    calibrated (no `calibration` in drafter.json). Raises DrafterFileError for a drafter without a confidence
    head."""
    meta = read_meta(path)
    tensors = load_file(str(Path(path) / WEIGHTS_FILE))
    if TEMPERATURES_TENSOR not in tensors:
        raise DrafterFileError(f"{path}: this drafter has no confidence head (no {TEMPERATURES_TENSOR!r})")
    records = meta.get("calibrations") or ([meta["calibration"]] if meta.get("calibration") else [])
    if not records:
        return []
    temps = np.atleast_2d(tensors[TEMPERATURES_TENSOR])
    biases = np.atleast_2d(tensors.get(BIASES_TENSOR, np.zeros_like(tensors[TEMPERATURES_TENSOR])))
    if len(records) != temps.shape[0]:
        raise DrafterFileError(f"{path}: {len(records)} calibration record(s) in {META_FILE} for "
                               f"{temps.shape[0]} calibration set(s)")
    return [CalibrationSet(float(r.get("sampling_temperature", 0.0)), t, b, r)
            for r, t, b in zip(records, temps, biases)]


def write_temperatures(src: str | os.PathLike, dst: str | os.PathLike, temperatures, calibration: dict,
                       biases=None, *, keep_other_sets: bool = False) -> Path:
    """Copies the drafter directory `src` to `dst` (which may be `src` itself) with new confidence-head
    temperatures [G] and per-position biases [G] (float32; None: zeros) fitted at
    `calibration["sampling_temperature"]` (default 0) and `calibration` recorded in drafter.json; every other
    tensor is copied byte for byte. `keep_other_sets`: the calibration sets `src` holds for other sampling
    temperatures stay (one set per temperature, [S, G] tensors; decoding uses each request's nearest); otherwise
    this set replaces them all. Written to a temporary directory first and swapped into place. Raises ValueError
    for temperatures that are not positive and finite, biases not finite or a negative sampling temperature."""
    src, dst = Path(src), Path(dst)
    meta = read_meta(src)
    sets = calibration_sets(src) if keep_other_sets else []
    tensors = load_file(str(src / WEIGHTS_FILE))
    if TEMPERATURES_TENSOR not in tensors:
        raise DrafterFileError(f"{src}: this drafter has no confidence head (no {TEMPERATURES_TENSOR!r})")
    temps, bias = checked_calibration(temperatures, biases, tensors[TEMPERATURES_TENSOR].shape[-1])
    at = float(calibration.get("sampling_temperature", 0.0))
    if not (np.isfinite(at) and at >= 0):
        raise ValueError(f"sampling_temperature must be a finite number >= 0, got {at}")
    sets = sorted([s for s in sets if not np.isclose(s.sampling_temperature, at)]
                  + [CalibrationSet(at, temps, bias, calibration)], key=lambda s: s.sampling_temperature)
    one = len(sets) == 1  # a single set is stored [G], as before calibration sets
    tensors[TEMPERATURES_TENSOR] = temps if one else np.stack([s.temperatures for s in sets]).astype(np.float32)
    tensors[BIASES_TENSOR] = bias if one else np.stack([s.biases for s in sets]).astype(np.float32)
    tensors[CALIBRATED_AT_TENSOR] = np.asarray([s.sampling_temperature for s in sets], np.float32)
    meta["calibration"] = calibration
    meta["calibrations"] = [s.record for s in sets]
    dst.parent.mkdir(parents=True, exist_ok=True)
    return _swap_into_place(_write_files(dst, tensors, meta), dst)


def _swap_into_place(tmp: Path, dst: Path) -> Path:
    """Moves the directory `tmp` (next to `dst`) to `dst`: an existing `dst` is first moved aside (renames only,
    so at every moment one complete directory is at `dst` or aside) and removed after the swap."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=dst.name + ".old"))
        os.replace(dst, old / dst.name)
        os.replace(tmp, dst)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dst)
    return dst


def hybrid_row_calibration(path: str | os.PathLike) -> tuple[float, ...] | None:
    """The weights [len(FEATURES)] of the row calibration a drafter directory holds for hybrids of it with prompt
    lookup (`drafters.hybrid_calibration`), None where it holds none; a record fitted on fewer features (a prefix of
    `FEATURES`: session 44's `LEGACY_FEATURES`) gets weight 0 for the rest — the map it was fitted as. Raises
    DrafterFileError for other features or non-finite weights."""
    from dspark_jax.drafters.hybrid_calibration import FEATURES, LEGACY_FEATURES, META_KEY
    record = read_meta(path).get(META_KEY)
    if record is None:
        return None
    features = tuple(record.get("features", ()))
    if features not in (FEATURES, LEGACY_FEATURES) or len(record.get("weights", ())) != len(features):
        raise DrafterFileError(f"{path}: its {META_KEY} has features {record.get('features')}, expected {FEATURES}")
    weights = tuple(float(w) for w in record["weights"]) + (0.0,) * (len(FEATURES) - len(features))
    if not all(np.isfinite(weights)):
        raise DrafterFileError(f"{path}: its {META_KEY} weights are not finite")
    return weights


def write_hybrid_row_calibration(path: str | os.PathLike, record: dict,
                                 dst: str | os.PathLike | None = None) -> Path:
    """Writes `record` (weights, features, and how they were fitted) as the hybrid row calibration (replacing any)
    into the drafter.json of the drafter directory `path`, or, with `dst` (not `path`), of a copy of it at `dst`
    (every other file byte for byte). Atomic: in place a new drafter.json swapped in; a copy written next to `dst`
    and swapped into place (`_swap_into_place`). Returns the directory written. Raises ValueError for weights that
    do not fit the features or are not finite (nothing written)."""
    from dspark_jax.drafters.hybrid_calibration import FEATURES, META_KEY
    weights = [float(w) for w in record.get("weights", ())]
    if len(weights) != len(FEATURES) or not all(np.isfinite(weights)):
        raise ValueError(f"a hybrid row calibration needs {len(FEATURES)} finite weights, got {weights}")
    path = Path(path)
    meta = read_meta(path)
    meta[META_KEY] = dict(record, weights=weights, features=list(FEATURES))
    if dst is not None and Path(dst).resolve() != path.resolve():
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=dst.name + ".tmp"))
        try:
            shutil.copytree(path, tmp, dirs_exist_ok=True)
            _write_meta(tmp, meta)
            return _swap_into_place(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _write_meta(path, meta)
    return path


def _write_meta(path: Path, meta: dict) -> None:
    """drafter.json of the directory `path` replaced by `meta`, atomically (a new file renamed over it)."""
    tmp = path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.chmod(0o644)
    os.replace(tmp, path / META_FILE)

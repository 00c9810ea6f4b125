"""Reading a target cache (format: `cache_format`; built by `cache_builder`) through memory maps."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from pathlib import Path

import numpy as np

from dspark_jax.training.cache_format import (CACHE_DTYPES, CACHE_VERSION, KIND_FEATURES, KIND_SEQUENCES,
                                              MANIFEST_NAME, STORAGE_DTYPES, config_fingerprint, decode_stored)
from dspark_jax.utils.bfloat16 import BFLOAT16


def _load_npy(path: Path, dtype, shape) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{path}: missing cache file")
    try:
        a = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: corrupted cache file ({e})") from None
    if a.dtype != np.dtype(dtype) or a.shape != tuple(shape):
        raise ValueError(f"{path}: expected {np.dtype(dtype)} {tuple(shape)}, found {a.dtype} {a.shape} "
                         f"(corrupted or from another build)")
    return a


@dataclasses.dataclass
class _Shard:
    offsets: np.ndarray
    arrays: dict


class TargetCache:
    """Read access to a cache directory written by `build_target_cache` / `build_sequence_cache`."""

    def __init__(self, path: Path, manifest: dict, shards: list[_Shard], layer_ids: tuple[int, ...] | None):
        self.path = path
        self.manifest = manifest
        self._shards = shards
        self.kind = manifest["kind"]
        self.dtype = manifest["dtype"]
        self.hidden_size = int(manifest["hidden_size"])
        self.cached_layer_ids = tuple(manifest["layer_ids"])
        self.layer_ids = self.cached_layer_ids if layer_ids is None else tuple(layer_ids)
        counts = [len(s.offsets) - 1 for s in shards]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.lengths = np.concatenate([np.diff(s.offsets) for s in shards]).astype(np.int64)
        pos = [self.cached_layer_ids.index(i) for i in self.layer_ids]
        self._columns = None if pos == list(range(len(self.cached_layer_ids))) else np.asarray(pos)
        self._limit: int | None = None

    @property
    def has_features(self) -> bool:
        return self.kind == KIND_FEATURES

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"]) if self._limit is None else int(self.lengths[:self._limit].sum())

    @property
    def num_loss_tokens(self) -> int:
        if self._limit is None:
            return int(self.manifest["num_loss_tokens"])
        return sum(int(shard.arrays["loss_mask"][a:e].sum()) for shard, a, e in map(self._locate, range(len(self))))

    def __len__(self) -> int:
        return int(self.manifest["num_samples"]) if self._limit is None else self._limit

    def first(self, n: int) -> "TargetCache":
        """A view of the first n sequences (learning curves: the cache is in response order, and any prefix of
        the shipped responses is a balanced mix of the training sources). Raises ValueError unless
        1 <= n <= len(self)."""
        if not 1 <= n <= len(self):
            raise ValueError(f"{self.path}: cannot take the first {n} of {len(self)} sequences")
        view = copy.copy(self)
        view._limit = n
        return view

    @classmethod
    def open(cls, path: str | os.PathLike, *, target_config=None,
             layer_ids: SequenceABC[int] | None = None) -> "TargetCache":
        """Opens and validates a cache. With `target_config` its fingerprint and hidden size must match; with
        `layer_ids` (a subset of the cached ids) only those feature columns are returned. Raises ValueError
        naming the offending file."""
        path = Path(path)
        mpath = path / MANIFEST_NAME
        if not mpath.is_file():
            raise ValueError(f"{mpath}: no manifest; not a target cache, or its build did not finish "
                             f"(rerun the build to resume it)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{mpath}: corrupted manifest ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("version") != CACHE_VERSION:
            version = manifest.get("version") if isinstance(manifest, dict) else None
            raise ValueError(f"{mpath}: unsupported cache version {version!r} (expected {CACHE_VERSION})")
        required = ("kind", "target", "layer_ids", "hidden_size", "dtype", "num_samples", "num_tokens", "shards")
        missing = [k for k in required if k not in manifest]
        if missing or manifest["kind"] not in (KIND_FEATURES, KIND_SEQUENCES):
            raise ValueError(f"{mpath}: corrupted manifest (missing {missing or 'a valid kind'})")
        features = manifest["kind"] == KIND_FEATURES
        if features and manifest["dtype"] not in CACHE_DTYPES:
            raise ValueError(f"{mpath}: unsupported feature dtype {manifest['dtype']!r}")
        if target_config is not None:
            if manifest["target"].get("fingerprint") != config_fingerprint(target_config):
                raise ValueError(f"{mpath}: cache was built for another target ({manifest['target'].get('name')!r} "
                                 f"from {manifest['target'].get('source')!r}); its config fingerprint does not "
                                 f"match {target_config.name or 'the given target'!r}")
            if manifest["hidden_size"] != target_config.hidden_size:
                raise ValueError(f"{mpath}: hidden size {manifest['hidden_size']} != target's "
                                 f"{target_config.hidden_size}")
        if layer_ids is not None:
            layer_ids = tuple(int(i) for i in layer_ids)
            if not features:
                raise ValueError(f"{mpath}: a sequences-only cache holds no target features (layer ids "
                                 f"{list(layer_ids)} requested)")
            absent = [i for i in layer_ids if i not in manifest["layer_ids"]]
            if absent or not layer_ids:
                raise ValueError(f"{mpath}: layer ids {absent or '[]'} are not cached "
                                 f"(cached: {manifest['layer_ids']})")
        d, m = int(manifest["hidden_size"]), len(manifest["layer_ids"])
        storage = STORAGE_DTYPES.get(manifest["dtype"])
        shards, total_samples, total_tokens = [], 0, 0
        for info in manifest["shards"]:
            sdir = path / info["name"]
            ns, nt = int(info["num_samples"]), int(info["num_tokens"])
            offsets = np.asarray(_load_npy(sdir / "offsets.npy", np.int64, (ns + 1,)))
            if offsets[0] != 0 or offsets[-1] != nt or np.any(np.diff(offsets) < 1):
                raise ValueError(f"{sdir / 'offsets.npy'}: inconsistent offsets")
            arrays = {"tokens": _load_npy(sdir / "tokens.npy", np.int32, (nt,)),
                      "loss_mask": _load_npy(sdir / "loss_mask.npy", np.uint8, (nt,))}
            if features:
                arrays["features"] = _load_npy(sdir / "features.npy", storage, (nt, m * d))
                arrays["last_hidden"] = _load_npy(sdir / "last_hidden.npy", storage, (nt, d))
                arrays["target_lse"] = _load_npy(sdir / "target_lse.npy", np.float32, (nt,))
            shards.append(_Shard(offsets, arrays))
            total_samples, total_tokens = total_samples + ns, total_tokens + nt
        if total_samples != manifest["num_samples"] or total_tokens != manifest["num_tokens"] or not shards:
            raise ValueError(f"{mpath}: shard counts do not add up to num_samples / num_tokens")
        return cls(path, manifest, shards, layer_ids)

    def _locate(self, i: int) -> tuple[_Shard, int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self._first, i, side="right")) - 1
        shard = self._shards[k]
        j = i - int(self._first[k])
        return shard, int(shard.offsets[j]), int(shard.offsets[j + 1])

    def _features(self, rows: np.ndarray) -> np.ndarray:
        if self._columns is None:
            return rows
        d = self.hidden_size
        return rows.reshape(rows.shape[0], -1, d)[:, self._columns].reshape(rows.shape[0], -1)

    def sample(self, i: int, *, max_len: int | None = None, as_float32: bool = True) -> dict:
        """Sample i (optionally cut to max_len): tokens int32 [T], loss_mask uint8 [T] and, for a feature cache,
        features [T, k*d] (the selected layers), last_hidden [T, d] (float32, or ml_dtypes.bfloat16 for a
        bfloat16 cache with as_float32=False), target_lse float32 [T]."""
        shard, a, e = self._locate(i)
        if max_len is not None:
            e = min(e, a + max_len)
        out = {"tokens": np.array(shard.arrays["tokens"][a:e]), "loss_mask": np.array(shard.arrays["loss_mask"][a:e])}
        if self.has_features:
            out["features"] = decode_stored(self._features(shard.arrays["features"][a:e]), self.dtype, as_float32)
            out["last_hidden"] = decode_stored(shard.arrays["last_hidden"][a:e], self.dtype, as_float32)
            out["target_lse"] = np.array(shard.arrays["target_lse"][a:e])
        return out

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The deterministic sample permutation of one epoch (a function of seed and epoch only)."""
        return np.random.default_rng([int(seed), int(epoch)]).permutation(len(self))

    def batches(self, batch_size: int, max_len: int, seed: int = 0, epoch: int = 0, *, shuffle: bool = True,
                drop_last: bool = False, as_float32: bool = True, pad_id: int = 0) -> Iterator[dict]:
        """Padded numpy batches over one epoch in `epoch_order(seed, epoch)` (index order if not shuffle).

        Each batch: indices int64 [B] (-1 for filler rows), lengths int32 [B] (after cutting to max_len),
        tokens int32 [B, max_len] (right-padded with pad_id), loss_mask uint8 [B, max_len] (0 on padding) and,
        for a feature cache, features [B, max_len, k*d], last_hidden [B, max_len, d], target_lse [B, max_len]
        (zeros on padding). Every batch has B = batch_size rows: the last one is completed with empty filler
        rows (length 0), or dropped with drop_last.
        """
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        order = self.epoch_order(seed, epoch) if shuffle else np.arange(len(self))
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        feat_dt = BFLOAT16 if self.has_features and not as_float32 and self.dtype == "bfloat16" else np.float32
        k = len(self.layer_ids)
        for b in range(0, stop, batch_size):
            idx = order[b:b + batch_size]
            out = {"indices": np.full(batch_size, -1, np.int64), "lengths": np.zeros(batch_size, np.int32),
                   "tokens": np.full((batch_size, max_len), pad_id, np.int32),
                   "loss_mask": np.zeros((batch_size, max_len), np.uint8)}
            if self.has_features:
                out["features"] = np.zeros((batch_size, max_len, k * self.hidden_size), feat_dt)
                out["last_hidden"] = np.zeros((batch_size, max_len, self.hidden_size), feat_dt)
                out["target_lse"] = np.zeros((batch_size, max_len), np.float32)
            for r, i in enumerate(idx):
                s = self.sample(int(i), max_len=max_len, as_float32=as_float32)
                t = len(s["tokens"])
                out["indices"][r], out["lengths"][r] = i, t
                for name, value in s.items():
                    out[name][r, :t] = value
            yield out


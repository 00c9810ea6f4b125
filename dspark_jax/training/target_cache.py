"""The drafter-training target cache: target features precomputed once, read back through memory maps.

Layout of a cache directory (format version 1)::

    manifest.json            written LAST and atomically: a directory without it is an unfinished build
    shard-00000/             one directory per shard, written as `shard-00000.tmp/` and renamed when complete
        shard.json           what the shard holds (sample range, token count, digest of its sequences, settings)
        offsets.npy          int64  [n_samples + 1]  token offsets of the shard's samples (offsets[0] = 0)
        tokens.npy           int32  [N]              prompt + response token ids of all samples, concatenated
        loss_mask.npy        uint8  [N]              1 on response tokens (the supervised ones)
        features.npy         [N, m*d]  raw outputs of the m tapped layers, concatenated in layer-id order
                                       (id -1 = the scaled embedding output)
        last_hidden.npy      [N, d]    the target's final-normed last hidden state
        target_lse.npy       float32 [N]  log-sum-exp of the target's full-vocabulary (soft-capped) logits
                                          where loss_mask == 1, else 0
    shard-00001/ ...

`features` and `last_hidden` are float32, or bfloat16 stored as raw uint16 bits (numpy has no bfloat16):
decode with `decode_bf16` (`(u16.astype(np.uint32) << 16).view(np.float32)`). float16 is refused: Gemma's
residual stream reaches ~8e4, past float16's 65504.

A "sequences" cache (`build_sequence_cache`, for online training where the trainer runs the target itself)
has the same layout without `features`, `last_hidden` and `target_lse`.

Resume: the shard split is a pure function of the sequence lengths and `shard_max_tokens` (`plan_shards`),
so a rerun with the same sequences and settings re-derives the same shards. Every finished shard directory
carries a `shard.json` with a digest of its sequences and the cache settings; a rerun skips the shards whose
`shard.json` matches, deletes leftover `*.tmp` directories, recomputes the missing shards and writes the
manifest. A finished shard that does not match (other sequences, target, layers, dtype or shard size) is an
error rather than silently overwritten.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from pathlib import Path

import numpy as np

from dspark_jax.decoding.autoregressive import prefill
from dspark_jax.generation import pad_batch
from dspark_jax.training.responses import PROMPT_FORMAT

CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_META_NAME = "shard.json"
CACHE_DTYPES = ("bfloat16", "float32")
KIND_FEATURES = "features"
KIND_SEQUENCES = "sequences"
SEQUENCE_FIELDS = ("tokens", "loss_mask")
FEATURE_FIELDS = ("features", "last_hidden", "target_lse")
_STORAGE = {"bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32)}


# ----------------------------------------------------------------------------------------------------------
# Sequences


@dataclasses.dataclass(frozen=True, eq=False)
class Sequence:
    """One training sample: `tokens` int32 [T] (prompt + response), `loss_mask` uint8 [T] (1 on the response)."""
    tokens: np.ndarray
    loss_mask: np.ndarray

    def __post_init__(self):
        if self.tokens.ndim != 1 or self.tokens.shape != self.loss_mask.shape:
            raise ValueError(f"tokens {self.tokens.shape} and loss_mask {self.loss_mask.shape} must be equal "
                             f"1-D shapes")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def make_sequence(prompt_ids: SequenceABC[int], response_ids: SequenceABC[int],
                  max_length: int | None = None) -> Sequence:
    """tokens = prompt + response, loss on the response (a final stop token included), cut to max_length."""
    tokens = np.asarray(list(prompt_ids) + list(response_ids), np.int32)
    mask = np.zeros(tokens.shape, np.uint8)
    mask[len(prompt_ids):] = 1
    if max_length is not None:
        tokens, mask = tokens[:max_length], mask[:max_length]
    return Sequence(tokens, mask)


def read_responses(path: str | os.PathLike) -> list[dict]:
    """The records of a `regenerate` JSONL file, sorted by prompt index (first record wins for an index).

    Lines that are not valid JSON are skipped with a warning (an interrupted `regenerate` can leave a torn line).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"responses file not found: {path}")
    records: dict[int, dict] = {}
    torn = 0
    # split on "\n" only: str.splitlines() would also split on U+2028 inside JSON strings
    for n, line in enumerate(p.read_text(encoding="utf-8").split("\n"), 1):
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
    if torn:
        logging.warning("%s: skipped %d line(s) that are not valid JSON (torn by an interrupted run?)", path, torn)
    return [records[i] for i in sorted(records)]


def sequences_from_responses(path: str | os.PathLike, min_loss_tokens: int = 14,
                             max_length: int | None = None) -> list[Sequence]:
    """Training sequences from a `regenerate` JSONL file, in prompt-index order: tokens = prompt_ids +
    response_ids, loss_mask = 1 on the response tokens. Sequences are cut to `max_length`, then those with
    fewer than `min_loss_tokens` supervised tokens are dropped."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out = []
    for rec in read_responses(path):
        seq = make_sequence(rec["prompt_ids"], rec["response_ids"], max_length)
        if seq.num_loss_tokens >= min_loss_tokens and seq.num_loss_tokens > 0:
            out.append(seq)
    return out


def plan_shards(lengths: SequenceABC[int], shard_max_tokens: int) -> list[tuple[int, int]]:
    """Deterministic split of samples (in order) into [start, end) ranges of at most `shard_max_tokens`
    tokens each (a longer single sample gets a shard of its own)."""
    if shard_max_tokens < 1:
        raise ValueError(f"shard_max_tokens must be >= 1, got {shard_max_tokens}")
    shards, start, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and tokens + n > shard_max_tokens:
            shards.append((start, i))
            start, tokens = i, 0
        tokens += int(n)
    if len(lengths) > start:
        shards.append((start, len(lengths)))
    return shards


def sequences_digest(sequences: SequenceABC[Sequence]) -> str:
    h = hashlib.sha256()
    for s in sequences:
        h.update(np.int64(len(s)).tobytes())
        h.update(np.ascontiguousarray(s.tokens, np.int32).tobytes())
        h.update(np.ascontiguousarray(s.loss_mask, np.uint8).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Sizes, dtypes, fingerprints


def check_cache_dtype(dtype: str) -> str:
    if dtype in ("float16", "half", "fp16"):
        raise ValueError("cache dtype float16 is not supported: target hidden states reach ~8e4 (Gemma), beyond "
                         "float16's maximum of 65504; use bfloat16 or float32")
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"unknown cache dtype {dtype!r}; choose from {', '.join(CACHE_DTYPES)}")
    return dtype


def estimate_cache_bytes(num_tokens: int, num_layers: int, hidden: int, dtype: str = "bfloat16") -> int:
    """Bytes of a feature cache: per token m*d features + d last hidden (in `dtype`), plus int32 token,
    uint8 mask and float32 log-sum-exp. `num_layers` = the number of TAPPED layers m."""
    item = _STORAGE[check_cache_dtype(dtype)].itemsize
    return int(num_tokens) * ((num_layers + 1) * hidden * item + 4 + 1 + 4)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def describe_cache_size(num_tokens: int, num_layers: int, hidden: int, dtype: str = "bfloat16") -> str:
    """One line for humans, e.g. `target cache: 1,000 tokens x (5 tapped layers + last hidden) x 640 x
    bfloat16 = 7.3 MiB (7,689 bytes/token)`."""
    total = estimate_cache_bytes(num_tokens, num_layers, hidden, dtype)
    per = total // max(int(num_tokens), 1)
    return (f"target cache: {num_tokens:,} tokens x ({num_layers} tapped layers + last hidden) x {hidden} x {dtype} "
            f"= {format_bytes(total)} ({per:,} bytes/token)")


def config_fingerprint(config) -> str:
    """The target's identity (`TransformerConfig.fingerprint`: fields except the display name, so the same
    model loaded from a GGUF or a Hugging Face directory matches). Weights are not fingerprinted."""
    return config.fingerprint()


def decode_bf16(u16: np.ndarray) -> np.ndarray:
    """bfloat16 stored as raw uint16 bits -> float32 (exact)."""
    return (np.asarray(u16).astype(np.uint32) << 16).view(np.float32)


def _decode(a: np.ndarray, dtype: str, as_float32: bool) -> np.ndarray:
    if dtype == "float32":
        return np.asarray(a, np.float32)
    if as_float32:
        return decode_bf16(a)
    import ml_dtypes  # a jax dependency
    return np.ascontiguousarray(a).view(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Building


def _auto_lse_chunk(vocab_size: int) -> int:
    """Rows of logits per chunk so that one chunk of float32 logits stays near 256 MiB."""
    rows = (1 << 26) // max(vocab_size, 1)
    return int(max(16, min(1024, 1 << max(rows.bit_length() - 1, 0))))


def _round_chunks(n: int) -> int:
    """Rounds a chunk count up to 1, 2, 3, 4, 6, 8, 12, 16, ... (few compiled shapes, <= 33% waste)."""
    p = 1
    while p < n:
        if p >= 2 and p * 3 // 2 >= n:
            return p * 3 // 2
        p *= 2
    return p


@functools.lru_cache(maxsize=None)
def _jitted():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def encode(x, dtype):
        if dtype == "bfloat16":
            return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
        return x.astype(jnp.float32)

    @functools.partial(jax.jit, static_argnames=("graphdef", "tap_layers", "dtype", "attn_impl"))
    def forward(graphdef, state, tokens, lengths, *, tap_layers, dtype, attn_impl):
        model = nnx.merge(graphdef, state)
        if tap_layers:
            _, out = prefill(model, tokens, lengths, tokens.shape[1], attn_impl, tap_layers)
            feats = encode(jnp.concatenate(out.taps, axis=-1), dtype)
        else:
            _, out = prefill(model, tokens, lengths, tokens.shape[1], attn_impl)
            feats = None
        return feats, encode(out.hidden, dtype), out.hidden

    @functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
    def masked_lse(graphdef, state, hidden, flat_index, *, chunk):
        """log-sum-exp of the full-vocabulary logits at hidden.reshape(-1, d)[flat_index], chunk rows at a time."""
        model = nnx.merge(graphdef, state)
        rows = hidden.reshape(-1, hidden.shape[-1])[flat_index]
        rows = rows.reshape(-1, chunk, rows.shape[-1])
        lse = jax.lax.map(lambda h: jax.nn.logsumexp(model.logits(h), axis=-1), rows)
        return lse.reshape(-1)

    return forward, masked_lse


def _settings(target, layer_ids, dtype: str | None, shard_max_tokens: int) -> dict:
    """What a finished shard must agree on to be reused."""
    return {"version": CACHE_VERSION, "kind": KIND_SEQUENCES if layer_ids is None else KIND_FEATURES,
            "target_fingerprint": config_fingerprint(target.config),
            "layer_ids": None if layer_ids is None else list(layer_ids), "dtype": dtype,
            "shard_max_tokens": int(shard_max_tokens)}


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def check_layer_ids(layer_ids, config) -> tuple[int, ...]:
    ids = tuple(int(i) for i in layer_ids)
    if not ids or list(ids) != sorted(set(ids)):
        raise ValueError(f"layer_ids must be non-empty and strictly increasing, got {list(layer_ids)}")
    bad = [i for i in ids if not -1 <= i < config.num_layers - 1]
    if bad:
        raise ValueError(f"layer ids {bad} cannot be tapped: the target has {config.num_layers} layers (valid ids: "
                         f"-1 = embedding output, 0..{config.num_layers - 2}; the last layer is not tapped)")
    return ids


def _check_sequences(sequences, config) -> None:
    if not sequences:
        raise ValueError("no sequences to cache")
    for i, s in enumerate(sequences):
        if len(s) == 0:
            raise ValueError(f"sequence {i} is empty")
        if len(s) > config.max_position_embeddings:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the target's context of "
                             f"{config.max_position_embeddings}; cut the sequences (max_length)")
        lo, hi = int(s.tokens.min()), int(s.tokens.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"sequence {i} has token ids outside [0, {config.vocab_size})")


def _open_existing(out_dir: Path, settings: dict, digest: str) -> bool:
    """True if `out_dir` already holds the finished cache for these sequences and settings."""
    path = out_dir / MANIFEST_NAME
    if not path.exists():
        return False
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise ValueError(f"{path}: unreadable manifest; delete it to rebuild the cache") from None
    have = manifest.get("settings", {})
    if have.get("build") == settings and have.get("sequences_sha256") == digest:
        return True
    raise ValueError(f"{out_dir} already holds a cache built from other sequences or settings "
                     f"(target, layer ids, dtype or shard size); use another output directory or delete it")


def _shard_is_done(shard_dir: Path, meta: dict) -> bool:
    if not shard_dir.exists():
        return False
    try:
        have = json.loads((shard_dir / SHARD_META_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        have = None
    if have != meta:
        raise ValueError(f"{shard_dir} was built from other sequences or settings (target, layer ids, dtype, "
                         f"shard size); use another output directory or delete it")
    return True


def build_target_cache(target, sequences: SequenceABC[Sequence], out_dir: str | os.PathLike,
                       layer_ids: SequenceABC[int] | None, *, dtype: str = "bfloat16", batch_size: int = 8,
                       shard_max_tokens: int = 2_000_000, progress: bool = True, lse_chunk: int | None = None,
                       attn_impl: str = "reference", prompt_format: str | None = None,
                       metadata: dict | None = None) -> Path:
    """Runs `target` over `sequences` and writes the feature cache to `out_dir` (see the module docstring).

    Batches of `batch_size` similar-length sequences are right-padded to `bucket_length` widths (few compiled
    shapes). The log-sum-exp is computed only at loss positions, `lse_chunk` rows of logits at a time (default:
    about 256 MiB of float32 logits). Resumable: finished shards are kept. `layer_ids=None` writes a sequences-
    only cache (no target run; see `build_sequence_cache`). `prompt_format` and `metadata` are recorded in the
    manifest. Returns `out_dir`.
    """

    config = target.config
    features = layer_ids is not None
    if features:
        dtype = check_cache_dtype(dtype)
        layer_ids = check_layer_ids(layer_ids, config)
    else:
        dtype = None
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sequences = list(sequences)
    _check_sequences(sequences, config)
    out_dir = Path(out_dir)
    settings = _settings(target, layer_ids, dtype, shard_max_tokens)
    digest = sequences_digest(sequences)
    lengths = [len(s) for s in sequences]
    num_tokens = int(sum(lengths))
    if _open_existing(out_dir, settings, digest):
        print(f"{out_dir}: cache already complete ({len(sequences):,} samples, {num_tokens:,} tokens)",
              file=sys.stderr)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("shard-*.tmp"):  # partial shards of an interrupted run
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    m = len(layer_ids) if features else 0
    d = config.hidden_size
    if features:
        print(describe_cache_size(num_tokens, m, d, dtype), file=sys.stderr)
    else:
        print(f"sequence cache: {num_tokens:,} tokens = {format_bytes(num_tokens * 5)}", file=sys.stderr)
    need = estimate_cache_bytes(num_tokens, m, d, dtype) if features else num_tokens * 5
    free = shutil.disk_usage(out_dir).free
    if need > free:
        print(f"warning: {out_dir} has only {format_bytes(free)} free", file=sys.stderr)

    plan = plan_shards(lengths, shard_max_tokens)
    shards = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_tokens, desc="target cache" if features else "sequence cache", unit="tok",
                   unit_scale=True, file=sys.stderr)
    for k, (start, end) in enumerate(plan):
        stem = f"shard-{k:05d}"
        chunk = sequences[start:end]
        meta = {"first_sample": start, "num_samples": end - start, "num_tokens": int(sum(lengths[start:end])),
                "sequences_sha256": sequences_digest(chunk), "settings": settings}
        final = out_dir / stem
        if not _shard_is_done(final, meta):
            tmp = out_dir / f"{stem}.tmp"
            tmp.mkdir()
            _write_shard(target, chunk, tmp, layer_ids, dtype, batch_size, lse_chunk, attn_impl, bar)
            _atomic_write_json(tmp / SHARD_META_NAME, meta)
            tmp.rename(final)
        elif bar is not None:
            bar.update(meta["num_tokens"])
        shards.append({"name": stem, "first_sample": start, "num_samples": end - start,
                       "num_tokens": meta["num_tokens"]})
    if bar is not None:
        bar.close()

    manifest = {
        "version": CACHE_VERSION,
        "kind": settings["kind"],
        "target": {"name": config.name, "source": str(getattr(target, "source", "")), "family": config.family,
                   "fingerprint": settings["target_fingerprint"], "num_layers": config.num_layers,
                   "vocab_size": config.vocab_size},
        "layer_ids": list(layer_ids) if features else [],
        "hidden_size": d,
        "dtype": dtype,
        "num_samples": len(sequences),
        "num_tokens": num_tokens,
        "num_loss_tokens": int(sum(s.num_loss_tokens for s in sequences)),
        "shards": shards,
        "prompt_format": PROMPT_FORMAT if prompt_format is None else prompt_format,
        "settings": {"build": settings, "sequences_sha256": digest, "batch_size": batch_size,
                     "lse_chunk": lse_chunk, "attn_impl": attn_impl,
                     "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     **(metadata or {})},
    }
    _atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    return out_dir


def build_sequence_cache(target, sequences: SequenceABC[Sequence], out_dir: str | os.PathLike, *,
                         shard_max_tokens: int = 2_000_000, progress: bool = True,
                         prompt_format: str | None = None, metadata: dict | None = None) -> Path:
    """Writes only tokens / loss masks (no target run) in the cache layout, for online training; open it with
    `TargetCache.open`. `target` supplies the config fingerprint (the token ids are its tokenizer's)."""
    return build_target_cache(target, sequences, out_dir, None, shard_max_tokens=shard_max_tokens,
                              progress=progress, prompt_format=prompt_format, metadata=metadata)


def _write_shard(target, chunk, shard_dir: Path, layer_ids, dtype, batch_size, lse_chunk, attn_impl, bar) -> None:
    import jax
    import jax.numpy as jnp
    from numpy.lib.format import open_memmap

    config = target.config
    lengths = np.array([len(s) for s in chunk], np.int64)
    offsets = np.zeros(len(chunk) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n = int(offsets[-1])
    d = config.hidden_size

    def mm(name, dt, shape):
        return open_memmap(shard_dir / f"{name}.npy", mode="w+", dtype=dt, shape=shape)

    np.save(shard_dir / "offsets.npy", offsets)
    tokens, mask = mm("tokens", np.int32, (n,)), mm("loss_mask", np.uint8, (n,))
    for j, s in enumerate(chunk):
        tokens[offsets[j]:offsets[j + 1]] = s.tokens
        mask[offsets[j]:offsets[j + 1]] = s.loss_mask
    arrays = [tokens, mask]
    if layer_ids is not None:
        storage = _STORAGE[dtype]
        feats = mm("features", storage, (n, len(layer_ids) * d))
        last = mm("last_hidden", storage, (n, d))
        lse_out = mm("target_lse", np.float32, (n,))
        arrays += [feats, last, lse_out]
        forward, masked_lse = _jitted()
        chunk_rows = lse_chunk or _auto_lse_chunk(config.vocab_size)
        order = sorted(range(len(chunk)), key=lambda j: (lengths[j], j))  # similar lengths batch together
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            toks, lens = pad_batch([chunk[j].tokens for j in idx], config.pad_token_id, batch_size)
            f_dev, h_dev, hidden = forward(target.graphdef, target.state, jnp.asarray(toks), jnp.asarray(lens),
                                           tap_layers=tuple(layer_ids), dtype=dtype, attn_impl=attn_impl)
            width = toks.shape[1]
            flat = np.concatenate([r * width + np.flatnonzero(chunk[j].loss_mask) for r, j in enumerate(idx)])
            lse = None
            if flat.size:
                size = _round_chunks(-(-flat.size // chunk_rows)) * chunk_rows
                padded = np.zeros(size, np.int32)
                padded[:flat.size] = flat
                lse = masked_lse(target.graphdef, target.state, hidden, jnp.asarray(padded), chunk=chunk_rows)
            f_host, h_host = jax.device_get((f_dev, h_dev))
            lse_host = np.asarray(jax.device_get(lse))[:flat.size] if lse is not None else None
            pos = 0
            for r, j in enumerate(idx):
                a, e, t = offsets[j], offsets[j + 1], int(lengths[j])
                feats[a:e] = f_host[r, :t]
                last[a:e] = h_host[r, :t]
                where = np.flatnonzero(chunk[j].loss_mask)
                row = np.zeros(t, np.float32)
                row[where] = lse_host[pos:pos + where.size] if where.size else 0.0
                pos += where.size
                lse_out[a:e] = row
            if bar is not None:
                bar.update(int(lengths[idx].sum()))
    elif bar is not None:
        bar.update(n)
    for a in arrays:
        a.flush()
    del arrays, tokens, mask


# ----------------------------------------------------------------------------------------------------------
# Reading


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

    @property
    def has_features(self) -> bool:
        return self.kind == KIND_FEATURES

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.manifest["num_loss_tokens"])

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

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
        storage = _STORAGE.get(manifest["dtype"])
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
            out["features"] = _decode(self._features(shard.arrays["features"][a:e]), self.dtype, as_float32)
            out["last_hidden"] = _decode(shard.arrays["last_hidden"][a:e], self.dtype, as_float32)
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
        feat_dt = np.float32
        if self.has_features and not as_float32 and self.dtype == "bfloat16":
            import ml_dtypes
            feat_dt = ml_dtypes.bfloat16
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

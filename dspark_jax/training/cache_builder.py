"""Building a target cache (format: `cache_format`): the target runs over the training sequences once, shard
by shard, resumably."""
from __future__ import annotations

import datetime
import functools
import json
import os
import shutil
import sys
from collections.abc import Sequence as SequenceABC
from pathlib import Path

import numpy as np

from dspark_jax.decoding.autoregressive import prefill
from dspark_jax.generation import pad_batch
from dspark_jax.training.cache_format import (CACHE_VERSION, KIND_FEATURES, KIND_SEQUENCES, MANIFEST_NAME,
                                              SHARD_META_NAME, STORAGE_DTYPES, check_cache_dtype, config_fingerprint,
                                              describe_cache_size, estimate_cache_bytes, format_bytes)
from dspark_jax.training.responses import PROMPT_FORMAT
from dspark_jax.training.sequences import Sequence, plan_shards, sequences_digest


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

    @functools.partial(jax.jit, static_argnames=("graphdef", "tap_layers", "dtype"))
    def forward(graphdef, state, tokens, lengths, *, tap_layers, dtype):
        model = nnx.merge(graphdef, state)
        if tap_layers:
            _, out = prefill(model, tokens, lengths, tokens.shape[1], tap_layers)
            feats = encode(jnp.concatenate(out.taps, axis=-1), dtype)
        else:
            _, out = prefill(model, tokens, lengths, tokens.shape[1])
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
    if have.get("build") == settings:
        return have.get("sequences_sha256") == digest  # other sequences: its shards decide (`_finished_prefix`)
    raise ValueError(f"{out_dir} already holds a cache built from other sequences or settings "
                     f"(target, layer ids, dtype or shard size); use another output directory or delete it")


def _finished_prefix(out_dir: Path, sequences: list[Sequence], settings: dict) -> list[tuple[int, int]]:
    """[start, end) ranges of the finished shards shard-00000, shard-00001, ... of an earlier build with the same
    settings that hold a prefix of `sequences`: a cache grows by appending sequences without recomputing the
    ones it has."""
    ranges, start = [], 0
    while start < len(sequences):
        try:
            meta = json.loads((out_dir / f"shard-{len(ranges):05d}" / SHARD_META_NAME).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            break
        n = meta.get("num_samples", 0) if isinstance(meta, dict) else 0
        if (not isinstance(n, int) or not 0 < n <= len(sequences) - start or meta.get("settings") != settings
                or meta.get("first_sample") != start
                or meta.get("sequences_sha256") != sequences_digest(sequences[start:start + n])):
            break
        ranges.append((start, start + n))
        start += n
    return ranges


def _reusable_shards(out_dir: Path, metas: list[dict]) -> set[int]:
    """Indices k of the finished shards shard-<k> in `out_dir` that hold exactly the planned shard `metas[k]`.
    Raises ValueError, before anything is computed, if any other finished shard is there (built from other
    sequences or settings, or lying past the plan: a cache only grows by appending sequences); nothing is
    overwritten or deleted."""
    reusable, stale = set(), []
    for path in sorted(out_dir.glob("shard-*")):
        index = path.name[len("shard-"):]
        if not (path.is_dir() and index.isdigit()):
            continue
        k = int(index)
        try:
            have = json.loads((path / SHARD_META_NAME).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            have = None
        if k < len(metas) and have == metas[k]:
            reusable.add(k)
        else:
            stale.append(path.name)
    if stale:
        raise ValueError(f"{out_dir / stale[0]} was built from other sequences or settings (target, layer ids, "
                         f"dtype, shard size) and is not part of this cache ({len(stale)} such shard(s): "
                         f"{', '.join(stale[:4])}{' ...' if len(stale) > 4 else ''}); a cache only grows by "
                         f"appending sequences: use another output directory or delete it")
    return reusable


def build_target_cache(target, sequences: SequenceABC[Sequence], out_dir: str | os.PathLike,
                       layer_ids: SequenceABC[int] | None, *, dtype: str = "bfloat16", batch_size: int = 8,
                       shard_max_tokens: int = 2_000_000, progress: bool = True, lse_chunk: int | None = None,
                       attn_impl: str = "reference", prompt_format: str | None = None,
                       metadata: dict | None = None) -> Path:
    """Runs `target` over `sequences` and writes the feature cache to `out_dir` (see the module docstring).

    Batches of `batch_size` similar-length sequences are right-padded to `bucket_length` widths (few compiled
    shapes). The log-sum-exp is computed only at loss positions, `lse_chunk` rows of logits at a time (default:
    about 256 MiB of float32 logits). Resumable: finished shards are kept, and a cache grows: run it again with
    more sequences appended (same settings) and only the new ones are computed, into new shards. `layer_ids=None`
    writes a sequences-only cache (no target run; see `build_sequence_cache`). `prompt_format` and `metadata` are
    recorded in the manifest. `attn_impl`: the attention implementation the target runs with. Returns `out_dir`.
    """
    if layer_ids is not None:
        target = target.with_attn_impl(attn_impl)
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

    plan = _finished_prefix(out_dir, sequences, settings)
    kept = plan[-1][1] if plan else 0
    plan += [(kept + a, kept + b) for a, b in plan_shards(lengths[kept:], shard_max_tokens)]
    metas = [{"first_sample": start, "num_samples": end - start, "num_tokens": int(sum(lengths[start:end])),
              "sequences_sha256": sequences_digest(sequences[start:end]), "settings": settings}
             for start, end in plan]
    reusable = _reusable_shards(out_dir, metas)
    shards = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_tokens, desc="target cache" if features else "sequence cache", unit="tok",
                   unit_scale=True, file=sys.stderr)
    for k, ((start, end), meta) in enumerate(zip(plan, metas)):
        stem = f"shard-{k:05d}"
        if k not in reusable:
            tmp = out_dir / f"{stem}.tmp"
            tmp.mkdir()
            _write_shard(target, sequences[start:end], tmp, layer_ids, dtype, batch_size, lse_chunk, bar)
            _atomic_write_json(tmp / SHARD_META_NAME, meta)
            tmp.rename(out_dir / stem)
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


def _write_shard(target, chunk, shard_dir: Path, layer_ids, dtype, batch_size, lse_chunk, bar) -> None:
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
        storage = STORAGE_DTYPES[dtype]
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
                                           tap_layers=tuple(layer_ids), dtype=dtype)
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


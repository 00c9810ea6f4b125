"""Corpus lookup: drafts from the target's own earlier responses (a datastore, as REST — He et al. 2024,
"REST: Retrieval-Based Speculative Decoding" — but an n-gram table instead of a suffix array).

Prompt lookup drafts only where the request repeats its own text. A small target also repeats itself *across*
requests — the same phrases, formulas and code idioms in answer after answer — and its greedy responses to the
training prompts are shipped with the project (`dspark_jax/data/train/`). The table maps every n-gram (n_min..n_max
tokens) of those responses to one occurrence's continuation: among the n-gram's occurrences, one whose next
`SIGNATURE` tokens are the most frequent continuation. A request's last n tokens (longest n first) are looked up by
a 32-bit hash (sorted, `jnp.searchsorted`) and checked token by token, so a hash collision never drafts another
n-gram's continuation; the draft is the `γ` corpus tokens after the occurrence, cut at the end of its response.

`drafters.ngram.NgramDrafter` with `corpus` proposes the corpus's draft where the request's own text has no match,
and over a short text match where the corpus's match is long (`takes_corpus`: a 1- or 2-token text match says
little; 4 or more tokens of context seen in the target's own responses say more). On the first 32 held-out prompts
of four sets (greedy, γ 15, every draft verified in full: an offline replay, `benchmarks/corpus_lookup.py`), with
matches of 2..5 tokens this rule against "the text first" reads τ 4.14 vs 4.10 (gsm8k), 6.82 vs 6.65 (humaneval),
2.66 vs 2.60 (mbpp), 3.27 vs 3.15 (mt-bench); prompt lookup alone 3.57 / 6.40 / 2.12 / 2.81 (BENCHMARKS.md
"Session 53"). Drafts are deterministic tokens (one-hot p_d), so verification stays exact at every temperature.

The table belongs to the target whose responses it holds: `CORPUS_FILE` names the target's fingerprint
(`ModelConfig.fingerprint`) and the response files; `shipped_corpus` refuses any other target.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import zipfile
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.data import responses as responses_module
from dspark_jax.data.responses import read_responses
from dspark_jax.utils.files import atomic_save_npz, cache_dir

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "train"
CORPUS_FILE = DATA_DIR / "corpus.json"
SEARCH = "scan_unrolled"  # `jnp.searchsorted`'s method: a binary search without a while loop's per-step cost
TEXT_YIELDS_AT = 2  # a text match of at most this many tokens yields to a long corpus match (`takes_corpus`)
CORPUS_WINS_AT = 4  # a corpus match of at least this many tokens is long
SIGNATURE = 4  # continuation tokens that pick an n-gram's representative occurrence (the most frequent ones)
_MIX = (np.uint32(0x9E3779B1), np.uint32(0x01000193), np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CorpusTable:
    """tokens [C]: the responses back to back, each followed by −1, and `max_draft` more −1 at the end; per table
    entry (S n-grams, sorted by hash, the most frequent first among equal hashes): hashes [S] uint32 (`ngram_hash`),
    keys [S, n_max] the n-gram's tokens right-aligned (−1 to the left of an n < n_max), order [S] its n, end [S]
    the position in `tokens` of its representative occurrence's last token, count [S] its occurrences."""
    tokens: jax.Array
    hashes: jax.Array
    keys: jax.Array
    order: jax.Array
    end: jax.Array
    count: jax.Array

    @property
    def n_max(self) -> int:
        return self.keys.shape[1]


def ngram_hash(windows, n: int):
    """[..., n] token windows (oldest first) → [...] uint32: an FNV-style hash of n and the tokens with a final
    avalanche; the same bits from numpy (`build_table`) and from JAX (`corpus_match`)."""
    xp = jnp if isinstance(windows, jax.Array) else np
    w = windows.astype(xp.uint32)
    h = xp.full(w.shape[:-1], (n * int(_MIX[0])) & 0xFFFFFFFF, xp.uint32)
    for j in range(n):
        h = (h ^ w[..., j]) * _MIX[1]
    h = h ^ (h >> 16)
    h = h * _MIX[2]
    h = h ^ (h >> 13)
    h = h * _MIX[3]
    return h ^ (h >> 16)


def _grouping_hash(columns: np.ndarray) -> np.ndarray:
    """[M, k] int64 → [M] uint64: FNV-1a over the columns, to group equal rows by one sort (a 64-bit collision
    between two of a corpus's ~10^6 n-grams is ~10^-7 likely; a lookup still checks every token)."""
    h = np.full(columns.shape[0], 0xCBF29CE484222325, np.uint64)
    for j in range(columns.shape[1]):
        h = (h ^ (columns[:, j] + 1).astype(np.uint64)) * np.uint64(0x100000001B3)
    return h


def build_table(responses: Sequence[Sequence[int]], n_min: int = 2, n_max: int = 4,
                max_draft: int = 64) -> CorpusTable:
    """The table of every n-gram (n_min <= n <= n_max) of `responses` (token ids) that some token follows, in
    numpy. Each n-gram's representative occurrence is the first one whose next `SIGNATURE` tokens (the end of a
    response counting as a token) are the most frequent among its occurrences. ValueError for bad lengths or an
    empty corpus."""
    if not 1 <= n_min <= n_max:
        raise ValueError(f"corpus n-gram lengths need 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
    pieces = [np.append(np.asarray(r, np.int64), -1) for r in responses if len(r)]
    if not pieces:
        raise ValueError("a corpus table needs at least one non-empty response")
    corpus = np.concatenate(pieces + [np.full(max(max_draft, SIGNATURE), -1, np.int64)])
    columns = {name: [] for name in ("hashes", "keys", "order", "end", "count")}
    for n in range(n_min, n_max + 1):
        ends = np.arange(n - 1, len(corpus) - SIGNATURE)
        windows = np.stack([corpus[ends - n + 1 + j] for j in range(n)], axis=1)
        usable = (windows >= 0).all(axis=1) & (corpus[ends + 1] >= 0)  # within one response, something follows
        ends, windows = ends[usable], windows[usable]
        if not len(ends):
            continue
        _, key_id, key_count = np.unique(_grouping_hash(windows), return_inverse=True, return_counts=True)
        signature = np.stack([corpus[ends + 1 + j] for j in range(SIGNATURE)], 1)
        signature[np.cumsum(signature < 0, axis=1) > 0] = -1  # nothing past the response's end
        follow = np.concatenate([windows, signature], 1)
        _, pair_id, pair_count = np.unique(_grouping_hash(follow), return_inverse=True, return_counts=True)
        # per key: the occurrence of its most frequent continuation, the first such (stable sorts)
        occurrence = np.lexsort((np.arange(len(ends)), -pair_count[pair_id], key_id))
        first = occurrence[np.r_[True, key_id[occurrence][1:] != key_id[occurrence][:-1]]]
        keys = np.full((len(first), n_max), -1, np.int64)
        keys[:, n_max - n:] = windows[first]
        columns["hashes"].append(ngram_hash(windows[first], n))
        columns["keys"].append(keys)
        columns["order"].append(np.full(len(first), n))
        columns["end"].append(ends[first])
        columns["count"].append(key_count[key_id[first]])
    table = {k: np.concatenate(v) for k, v in columns.items()}
    order = np.lexsort((-table["count"], table["hashes"]))  # by hash; the most frequent first among equal hashes
    as_int = dict(hashes=np.uint32, keys=np.int32, order=np.int32, end=np.int32, count=np.int32)
    return CorpusTable(tokens=jnp.asarray(corpus, jnp.int32),
                       **{k: jnp.asarray(table[k][order].astype(as_int[k])) for k in as_int})


def corpus_match(table: CorpusTable, tokens: jax.Array, last: jax.Array, n_min: int) -> tuple[jax.Array, jax.Array]:
    """The longest suffix (n_min..table.n_max tokens) of each request's text ending at `last` [B] (tokens [B, L])
    that the table holds: (end [B], the position in `table.tokens` of its occurrence's last token, −1 without one;
    n [B], 0 without one)."""
    rows, s = tokens.shape[0], table.hashes.shape[0]
    end, found = jnp.full((rows,), -1, jnp.int32), jnp.zeros((rows,), jnp.int32)
    for n in range(n_min, table.n_max + 1):  # longer matches override shorter ones
        pos = last[:, None] - (n - 1) + jnp.arange(n)[None]
        window = jnp.take_along_axis(tokens, jnp.clip(pos, 0, tokens.shape[1] - 1), axis=1)
        h = ngram_hash(window, n)
        i = jnp.clip(jnp.searchsorted(table.hashes, h, method=SEARCH), 0, s - 1)
        hit = ((pos[:, 0] >= 0) & (table.hashes[i] == h) & (table.order[i] == n)
               & jnp.all(table.keys[i, table.n_max - n:] == window, axis=1))
        end = jnp.where(hit, table.end[i], end)
        found = jnp.where(hit, n, found)
    return end, found


def takes_corpus(text_n, corpus_n):
    """Whether a request drafts from the corpus rather than its own text, from the two matches' lengths (numpy or
    JAX arrays; 0: no match): where the text has no match, or only a short one (<= `TEXT_YIELDS_AT` tokens) and the
    corpus a long one (>= `CORPUS_WINS_AT`). Reads only the committed text, so the choice keeps verification
    lossless (offline replay: module docstring)."""
    return (corpus_n > 0) & ((text_n == 0) | ((text_n <= TEXT_YIELDS_AT) & (corpus_n >= CORPUS_WINS_AT)))


def corpus_proposal(table: CorpusTable, end: jax.Array, gamma: int) -> tuple[jax.Array, jax.Array]:
    """([B, γ] the corpus tokens after each match's `end` (`corpus_match`; −1 past its response's end, token 0
    without a match), [B] how many of them lie within the response: the draft's length, 0 without a match)."""
    idx = jnp.clip(end[:, None] + 1 + jnp.arange(gamma)[None], 0, table.tokens.shape[0] - 1)
    drafted = table.tokens[idx]
    inside = jnp.cumprod((drafted >= 0) & (end >= 0)[:, None], axis=1)
    return jnp.where(drafted >= 0, drafted, 0), inside.sum(axis=1).astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def shipped_corpus_spec() -> dict:
    """`CORPUS_FILE`: {"target_fingerprint", "files": [...], "n_min", "n_max"}."""
    return json.loads(CORPUS_FILE.read_text())


def has_shipped_corpus(fingerprint: str) -> bool:
    """Whether the project ships a response corpus for the target with this `ModelConfig.fingerprint`."""
    return CORPUS_FILE.exists() and shipped_corpus_spec()["target_fingerprint"] == fingerprint


def table_cache_path(spec: dict, max_draft: int) -> Path:
    """Where the shipped table is cached (`shipped_corpus`): `cache_dir()/corpus/<key>.npz`, the key a hash of the
    spec, max_draft, the response files' bytes and the code that reads them and builds the table (this module and
    `data.responses`), so any change to one of them builds a new table."""
    h = hashlib.sha256(json.dumps([spec, max_draft], sort_keys=True).encode())
    for path in [Path(__file__), Path(responses_module.__file__)] + [DATA_DIR / name for name in spec["files"]]:
        h.update(path.read_bytes())
    return cache_dir() / "corpus" / f"{h.hexdigest()[:20]}.npz"


def _load_cached(path: Path) -> CorpusTable | None:
    """The table cached at `path`, None where there is none or it is unreadable (then rebuilt and rewritten)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return CorpusTable(**{f.name: jnp.asarray(z[f.name]) for f in dataclasses.fields(CorpusTable)})
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        logging.warning("corpus table cache %s is unreadable (%s): rebuilding it", path, e)
        return None


@functools.lru_cache(maxsize=2)
def shipped_corpus(fingerprint: str, max_draft: int = 64) -> CorpusTable:
    """The table of the shipped responses of the target with this fingerprint: built once (~5 s on a 2-core CPU)
    and cached on disk (`table_cache_path`; ~30 MB, loaded in ~0.05 s), once per process in memory. ValueError where
    the project ships none for it."""
    if not has_shipped_corpus(fingerprint):
        raise ValueError(f"no response corpus is shipped for the target with fingerprint {fingerprint!r} (the "
                         f"corpus of {CORPUS_FILE.parent} belongs to "
                         f"{shipped_corpus_spec()['target_fingerprint'] if CORPUS_FILE.exists() else 'no target'})")
    spec = shipped_corpus_spec()
    path = table_cache_path(spec, max_draft)
    table = _load_cached(path)
    if table is None:
        responses = [r["response_ids"] for name in spec["files"] for r in read_responses(DATA_DIR / name)]
        table = build_table(responses, spec["n_min"], spec["n_max"], max_draft)
        try:
            atomic_save_npz(path, {f.name: np.asarray(getattr(table, f.name)) for f in dataclasses.fields(CorpusTable)})
        except OSError as e:  # a read-only cache folder: build it again next time
            logging.warning("could not cache the corpus table at %s (%s)", path, e)
    return table

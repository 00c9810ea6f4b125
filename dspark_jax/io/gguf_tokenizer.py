"""Tokenizers rebuilt from a GGUF file's vocabulary (`tokenizer_from_gguf`); they implement
`io.tokenizer.Tokenizer`.

* `tokenizer_from_gguf` handles the two tokenizer families llama.cpp writes:
  - `tokenizer.ggml.model == "llama"` (SentencePiece, e.g. Gemma 3): an exact SentencePiece BPE
    `ModelProto` is rebuilt from the GGUF vocabulary, scores and token types and run with
    `sentencepiece`. Whitespace-only pieces, which GGUF stores with real spaces, are respelled with
    U+2581. Control tokens (`<start_of_turn>`, `<bos>`, ...) are stored as user-defined pieces so
    that, like HF transformers' GGUF tokenizer, they are recognised when written literally in text;
    `decode(skip_special_tokens=True)` drops them. Runs of spaces are the one place where
    sentencepiece (greedy user-defined pieces: 50 spaces -> 31 + 19) and HF's tokenizer (BPE
    with merges derived from vocabulary order: 16 + 16 + 18) differ; runs are split the HF way
    (`split_space_run`). With that, ids match `AutoTokenizer.from_pretrained(dir, gguf_file=name)`
    (see tests/io/test_tokenizer.py). Decoding matches HF too, except for invalid UTF-8 byte-piece
    sequences, where sentencepiece keeps the valid bytes and HF turns every byte into U+FFFD.
  - `tokenizer.ggml.model == "gpt2"` (byte-level BPE with merges, e.g. Qwen): rebuilt as a
    `tokenizers` byte-level BPE. The split regex is chosen from `tokenizer.ggml.pre` (Qwen2 and
    Llama-3 style are known; anything else falls back to the GPT-2 regex). This path is checked
    against a directly built `tokenizers` model only, not against a real Qwen GGUF.
  Any other tokenizer model raises `TokenizerError` (a `ValueError`).
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import os
import re
from typing import Any, Callable, Mapping, Sequence

from dspark_jax.io.gguf_file import GGUFFile
from dspark_jax.io.tokenizer import (END_OF_TURN_PIECES, SPIECE_SPACE, HFTokenizer, SpecialIds, SpecialIdsMixin,
                                     Tokenizer, TokenizerError, check_id, stop_ids_of)

# llama.cpp token types (`tokenizer.ggml.token_type`); SentencePiece uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# --------------------------------------------------------------------------------------------------
# SentencePiece (GGUF `llama` tokenizers)


_SPACE_RUN = re.compile("[ \u2581]{2,}")


@functools.lru_cache(maxsize=1024)
def split_space_run(run_ids: tuple[int, ...], n: int) -> tuple[int, ...]:
    """Ids for a run of `n` spaces, as BPE with merges ranked by vocabulary position splits it.

    `run_ids[k - 1]` is the id of the piece of k spaces. HF's GGUF Gemma tokenizer derives its merges
    from the vocabulary: a merge ranks by the position of the token it makes, then by the longer
    left part; equal merges apply leftmost first. Runs longer than the longest space piece thus
    come out as e.g. 16 + 16 + 18 for 50 spaces, where sentencepiece's user-defined pieces would
    give 31 + 19.
    """
    max_len = len(run_ids)

    def rank(a: int, b: int) -> tuple[int, int] | None:
        return (run_ids[a + b - 1], -a) if a + b <= max_len else None

    lens = [1] * n
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    heap = [(rank(1, 1), i, 1, 1) for i in range(n - 1)] if max_len >= 2 else []
    heapq.heapify(heap)
    while heap:
        _, i, a, b = heapq.heappop(heap)
        j = nxt[i] if lens[i] else n
        if j >= n or lens[i] != a or lens[j] != b:
            continue  # stale entry
        lens[i], lens[j] = a + b, 0
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
        for left, right in ((prv[i], i), (i, nxt[i])):
            if left >= 0 and right < n:
                r = rank(lens[left], lens[right])
                if r is not None:
                    heapq.heappush(heap, (r, left, lens[left], lens[right]))
    return tuple(run_ids[k - 1] for k in lens if k)


@dataclasses.dataclass(frozen=True, eq=False)
class SentencePieceTokenizer(SpecialIdsMixin):
    """A `sentencepiece` processor plus the special-token facts a GGUF records."""

    processor: Any  # sentencepiece.SentencePieceProcessor
    special: SpecialIds
    control_ids: frozenset[int]  # dropped by decode(skip_special_tokens=True)
    literal_pieces: tuple[tuple[str, int], ...] = ()  # special pieces sentencepiece cannot match in text
    space_run_ids: tuple[int, ...] = ()  # ids of 1, 2, ... spaces when runs are split as by BPE

    @property
    def vocab_size(self) -> int:
        return self.processor.GetPieceSize()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos and self.add_bos and self.bos_id is not None else []
        ids.extend(self._encode_split(text, self.literal_pieces))
        return ids

    def _encode_split(self, text: str, literals: tuple[tuple[str, int], ...]) -> list[int]:
        if not literals:
            return self._encode_runs(text)
        (piece, piece_id), rest = literals[0], literals[1:]
        out: list[int] = []
        for k, part in enumerate(text.split(piece)):
            if k:
                out.append(piece_id)
            out.extend(self._encode_split(part, rest))
        return out

    def _encode_runs(self, text: str) -> list[int]:
        if not self.space_run_ids:
            return self._encode_sp(text)
        out: list[int] = []
        pos = 0
        for m in _SPACE_RUN.finditer(text):
            out.extend(self._encode_sp(text[pos:m.start()]))
            out.extend(split_space_run(self.space_run_ids, m.end() - m.start()))
            pos = m.end()
        out.extend(self._encode_sp(text[pos:]))
        return out

    def _encode_sp(self, text: str) -> list[int]:
        return list(self.processor.EncodeAsIds(text)) if text else []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [check_id(i, self.vocab_size) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.control_ids]
        return self.processor.DecodeIds(ids)

    def id_to_piece(self, i: int) -> str:
        return self.processor.IdToPiece(check_id(i, self.vocab_size))


def _sentencepiece_proto(md: Mapping[str, Any], where: str) -> tuple[bytes, frozenset[int], int]:
    """Serialized SentencePiece BPE `ModelProto` for a GGUF `llama` vocabulary.

    Returns (proto bytes, ids of control tokens, id of the unknown piece).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens: list[str] = list(md["tokenizer.ggml.tokens"])
    n = len(tokens)
    scores = md.get("tokenizer.ggml.scores")
    scores = [float(-i) for i in range(n)] if scores is None else [float(s) for s in scores]
    types = md.get("tokenizer.ggml.token_type")
    types = [NORMAL] * n if types is None else [int(t) for t in types]
    if len(scores) != n or len(types) != n:
        raise TokenizerError(f"{where}: tokenizer.ggml.tokens/scores/token_type lengths differ "
                             f"({n}, {len(scores)}, {len(types)})")

    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    if unk_id is None or not 0 <= int(unk_id) < n:
        raise TokenizerError(f"{where}: SentencePiece vocabulary has no unknown token")
    unk_id = int(unk_id)

    control_ids = frozenset(i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)) | {unk_id}
    have_bytes = {tokens[i] for i, t in enumerate(types) if t == BYTE}
    byte_fallback = all(f"<0x{b:02X}>" in have_bytes for b in range(256))

    proto = pb.ModelProto()
    seen: set[str] = set()
    add = proto.pieces.add
    for i, (tok, score, ttype) in enumerate(zip(tokens, scores, types)):
        if ttype == CONTROL or ttype == UNKNOWN:
            # Matched when written literally in text, like HF's special added tokens.
            ttype = USER_DEFINED
        elif ttype not in (NORMAL, USER_DEFINED, UNUSED, BYTE):
            ttype = NORMAL
        if i == unk_id:
            ttype = UNKNOWN
        if " " in tok and not tok.strip(" "):
            tok = tok.replace(" ", SPIECE_SPACE)
        if tok in seen or not tok or any("\ud800" <= c <= "\udfff" for c in tok):
            # Duplicate, empty or not valid UTF-8: keep the id, never produce it.
            tok, ttype = f"<dspark:unrepresentable:{i}>", UNUSED
        seen.add(tok)
        add(piece=tok, score=score, type=ttype)

    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = byte_fallback
    ts.allow_whitespace_only_pieces = True
    ts.split_by_whitespace = False
    ts.treat_whitespace_as_suffix = False
    ts.unk_id = unk_id
    ts.unk_piece = proto.pieces[unk_id].piece
    ts.unk_surface = tokens[unk_id]
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        tid = md.get(f"tokenizer.ggml.{key}_token_id")
        tid = int(tid) if tid is not None and 0 <= int(tid) < n else -1
        setattr(ts, f"{name}_id", tid)
        if tid >= 0:
            setattr(ts, f"{name}_piece", proto.pieces[tid].piece)

    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString(), control_ids, unk_id


def _gguf_special_ids(md: Mapping[str, Any], vocab_size: int, piece_to_id: Callable[[str], int | None],
                      add_bos_default: bool) -> SpecialIds:
    def get(key: str) -> int | None:
        v = md.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < vocab_size else None

    bos, eos = get("bos_token_id"), get("eos_token_id")
    stops = stop_ids_of([eos, get("eot_token_id"), get("eom_token_id")], piece_to_id)
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    return SpecialIds(bos, eos, get("padding_token_id"), stops, add_bos)


def _sentencepiece_from_gguf(md: Mapping[str, Any], where: str) -> SentencePieceTokenizer:
    import sentencepiece as spm

    proto, control_ids, unk_id = _sentencepiece_proto(md, where)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    tokens = md["tokenizer.ggml.tokens"]
    index = {t: i for i, t in enumerate(tokens) if t in END_OF_TURN_PIECES}
    special = _gguf_special_ids(md, processor.GetPieceSize(), index.get, add_bos_default=True)
    # sentencepiece never matches its unknown piece in text; HF does, so split on it ourselves.
    literals = ((tokens[unk_id], unk_id),)
    return SentencePieceTokenizer(processor, special, control_ids, literals, _space_run_ids(tokens, md))


def _space_run_ids(tokens: Sequence[str], md: Mapping[str, Any]) -> tuple[int, ...]:
    """Ids of the pieces of 1..K spaces if runs need BPE-style splitting (see `split_space_run`).

    Only for vocabularies like Gemma's, whose space runs are user-defined pieces: sentencepiece
    matches those greedily, longest first, while HF's tokenizer merges them as ordinary BPE tokens.
    """
    types = md.get("tokenizer.ggml.token_type")
    runs = {t: i for i, t in enumerate(tokens) if t and not t.strip(" ")}
    if SPIECE_SPACE in tokens:
        runs.setdefault(" ", tokens.index(SPIECE_SPACE))
    ids: list[int] = []
    while " " * (len(ids) + 1) in runs:
        ids.append(runs[" " * (len(ids) + 1)])
    if len(ids) < 2 or types is None or any(int(types[i]) != USER_DEFINED for i in ids[1:]):
        return ()
    return tuple(ids)


# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (the published patterns of these families).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def _byte_level_from_gguf(md: Mapping[str, Any], where: str) -> HFTokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFBackend

    tokens: list[str] = list(md["tokenizer.ggml.tokens"])
    merges = md.get("tokenizer.ggml.merges")
    if merges is None:
        raise TokenizerError(f"{where}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    types = md.get("tokenizer.ggml.token_type")
    types = [NORMAL] * len(tokens) if types is None else [int(t) for t in types]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFBackend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    split = _SPLITS.get(str(md.get("tokenizer.ggml.pre", "")), _GPT2_SPLIT)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    special = _gguf_special_ids(md, len(tokens), vocab.get, add_bos_default=False)
    return HFTokenizer(backend, special)


def tokenizer_from_gguf(gguf: GGUFFile | str | os.PathLike) -> Tokenizer:
    """The tokenizer stored in a GGUF file (a `GGUFFile` or a path).

    Raises `TokenizerError` (a `ValueError`) if the file has no tokenizer or an unsupported one.
    """
    g = gguf if isinstance(gguf, GGUFFile) else GGUFFile(gguf)
    path, md = g.path, g.metadata
    model = md.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in md:
        raise TokenizerError(f"{path}: GGUF file has no tokenizer (no tokenizer.ggml.model / "
                             f"tokenizer.ggml.tokens metadata)")
    if model == "llama":
        return _sentencepiece_from_gguf(md, path)
    if model == "gpt2":
        return _byte_level_from_gguf(md, path)
    raise TokenizerError(f"{path}: unsupported GGUF tokenizer model {model!r} "
                         f"(supported: 'llama' = SentencePiece, 'gpt2' = byte-level BPE)")



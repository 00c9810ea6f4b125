"""The tokenizer protocol of dspark-jax, and tokenizers loaded from a HF directory (`tokenizer_from_hf_dir`:
`tokenizer.json` run by `tokenizers`, BOS / EOS / PAD read from the JSON configs next to it). Tokenizers rebuilt
from a GGUF file: `io.gguf_tokenizer`.

`encode(text, add_bos=True)` prepends BOS only when the tokenizer's model wants one (`add_bos`);
`add_bos=False` never does. No other special tokens (EOS, post-processor templates) are added.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

SPIECE_SPACE = "\u2581"
# Pieces that end a chat turn; whichever are in the vocabulary join EOS in `stop_ids`.
END_OF_TURN_PIECES = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")



class TokenizerError(ValueError):
    """A tokenizer could not be built: missing, unreadable or unsupported tokenizer data."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the decoding code needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def pad_id(self) -> int | None: ...

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: EOS first, then end-of-turn tokens."""
        ...

    @property
    def add_bos(self) -> bool:
        """Whether `encode(text)` prepends BOS by default."""
        ...

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; BOS first if `add_bos` and the model wants one. Special tokens
        written literally in `text` (e.g. `<start_of_turn>`) become their ids."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; control tokens (BOS, `<end_of_turn>`, ...) are dropped if asked."""
        ...

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id `i` (raises IndexError when out of range)."""
        ...


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Special-token ids of a tokenizer and whether it prepends BOS."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    stop_ids: tuple[int, ...]
    add_bos: bool


def stop_ids_of(eos_ids: Iterable[int | None], piece_to_id: Callable[[str], int | None]) -> tuple[int, ...]:
    """EOS ids (deduplicated, in order) followed by the end-of-turn pieces the vocabulary has."""
    out: list[int] = []
    candidates = list(eos_ids) + [piece_to_id(p) for p in END_OF_TURN_PIECES]
    for i in candidates:
        if i is not None and i not in out:
            out.append(int(i))
    return tuple(out)


def check_id(i: int, vocab_size: int) -> int:
    i = int(i)
    if not 0 <= i < vocab_size:
        raise IndexError(f"token id {i} out of range [0, {vocab_size})")
    return i


class SpecialIdsMixin:
    """bos/eos/pad/stop ids and the BOS policy, read from a `special: SpecialIds` field."""

    @property
    def bos_id(self) -> int | None:
        return self.special.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.special.eos_id

    @property
    def pad_id(self) -> int | None:
        return self.special.pad_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.special.stop_ids

    @property
    def add_bos(self) -> bool:
        return self.special.add_bos


# --------------------------------------------------------------------------------------------------
# `tokenizers` (HF directories and GGUF `gpt2` tokenizers)


@dataclasses.dataclass(frozen=True, eq=False)
class HFTokenizer(SpecialIdsMixin):
    """A `tokenizers.Tokenizer`; special tokens (BOS) are added here, never by its post-processor."""

    backend: Any  # tokenizers.Tokenizer
    special: SpecialIds

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos and self.add_bos and self.bos_id is not None else []
        ids.extend(self.backend.encode(text, add_special_tokens=False).ids)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [check_id(i, self.vocab_size) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, i: int) -> str:
        return self.backend.id_to_token(check_id(i, self.vocab_size))

# --------------------------------------------------------------------------------------------------
# HF directories


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_content(v: Any) -> str | None:
    """A special token as written in tokenizer_config / special_tokens_map: str or AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _as_id_list(v: Any) -> list[int]:
    if isinstance(v, bool) or v is None:
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, (list, tuple)):
        return [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return []


def _hf_special_ids(backend: Any, configs: Sequence[dict[str, Any]]) -> SpecialIds:
    """BOS/EOS/PAD from (tokenizer_config, special_tokens_map, config, generation_config)."""
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    tok_cfg, st_map, cfg, gen_cfg = configs

    def valid(ids: Iterable[int]) -> list[int]:
        return [i for i in ids if 0 <= i < vocab_size]

    def resolve(name: str) -> list[int]:
        ids: list[int] = []
        for c in (tok_cfg, st_map):
            s = _token_content(c.get(f"{name}_token"))
            tid = backend.token_to_id(s) if s is not None else None
            if tid is not None:
                ids.append(tid)
        for c in (cfg, gen_cfg):
            ids.extend(valid(_as_id_list(c.get(f"{name}_token_id"))))
        return list(dict.fromkeys(ids))

    bos, eos, pad = resolve("bos"), resolve("eos"), resolve("pad")
    bos_id = bos[0] if bos else None
    if "add_bos_token" in tok_cfg:
        add_bos = bool(tok_cfg["add_bos_token"])
    else:  # does the post-processor prepend a token?
        with_special = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
        add_bos = len(with_special) > len(plain) and with_special[1:len(plain) + 1] == plain
        if add_bos and bos_id is None:
            bos_id = with_special[0]
        elif add_bos and with_special[0] != bos_id:
            add_bos = False
    return SpecialIds(bos_id, eos[0] if eos else None, pad[0] if pad else None,
                      stop_ids_of(eos, backend.token_to_id), add_bos and bos_id is not None)


def tokenizer_from_hf_dir(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a HF model directory (`tokenizer.json` plus the JSON configs)."""
    from tokenizers import Tokenizer as HFBackend

    path = os.fspath(path)
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        raise TokenizerError(f"no tokenizer.json in {path}")
    try:
        backend = HFBackend.from_file(tj)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"cannot load {tj}: {e}") from e
    backend.no_truncation()
    backend.no_padding()
    names = ("tokenizer_config.json", "special_tokens_map.json", "config.json", "generation_config.json")
    configs = [_read_json(os.path.join(path, n)) for n in names]
    return HFTokenizer(backend, _hf_special_ids(backend, configs))


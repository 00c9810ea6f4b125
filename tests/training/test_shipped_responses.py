"""The training responses shipped in the package (`dspark_jax/data/train/`): every file reads, and every record
answers a training-pool prompt with token ids of the embedded target's vocabulary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import dspark_jax
from dspark_jax.data.responses import read_responses

TRAIN_DIR = Path(dspark_jax.__file__).parent / "data" / "train"
GEMMA3_VOCAB, GEMMA3_BOS = 262_144, 2


@pytest.mark.parametrize("name", ["gemma3_270m_greedy_responses.jsonl.gz",
                                  "gemma3_270m_sampled_responses_seed1.jsonl.gz"])
def test_shipped_responses_are_well_formed(name):
    order = json.loads((TRAIN_DIR / "prompt_order.json").read_text())
    assert sorted(order) == list(range(len(order))) == list(range(2924))  # a permutation of the training pool
    records = read_responses(TRAIN_DIR / name)
    assert len(records) > 1000
    for r in records:
        assert 0 <= r["index"] < len(order)
        assert r["prompt_ids"][0] == GEMMA3_BOS and len(r["prompt_ids"]) <= 256
        assert 0 < len(r["response_ids"]) <= 256
        assert all(0 <= t < GEMMA3_VOCAB for t in r["prompt_ids"] + r["response_ids"])


def test_sampled_and_greedy_responses_answer_the_same_prompts():
    greedy = {r["index"]: r["prompt_ids"] for r in read_responses(TRAIN_DIR / "gemma3_270m_greedy_responses.jsonl.gz")}
    sampled = read_responses(TRAIN_DIR / "gemma3_270m_sampled_responses_seed1.jsonl.gz")
    assert all(r["prompt_ids"] == greedy[r["index"]] for r in sampled)

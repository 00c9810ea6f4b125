"""`dspark eval --heldout_dir`: the teacher-forced held-out scores of each drafter, read from a held-out feature
cache at the drafter's own tapped layers, printed and written as JSON (DSpark and Eagle3 here)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dspark_jax.cli.eval import report_heldout
from dspark_jax.drafters.factory import random_drafter
from dspark_jax.testing.tiny_target import make_tiny_target
from dspark_jax.training.cache_builder import build_target_cache
from dspark_jax.training.heldout import cache_quality
from dspark_jax.training.sequences import make_sequence


def test_heldout_scores_per_drafter(tmp_path):
    target = make_tiny_target()
    dspark = random_drafter(target, "dspark", gamma=3, num_layers=1)
    eagle = random_drafter(target, "eagle3", gamma=3, num_layers=1)
    rng = np.random.default_rng(0)
    seqs = [make_sequence(rng.integers(3, 40, 6).tolist(), rng.integers(3, 40, 20).tolist()) for _ in range(5)]
    build_target_cache(target, seqs, tmp_path / "held" / "cache", dspark.config.target_layer_ids, dtype="float32",
                       batch_size=4, progress=False)
    scores = report_heldout(target, [("D", dspark), ("E", eagle)], str(tmp_path / "held"), tmp_path / "out.json")
    assert list(scores) == ["D", "E"]
    assert scores["E"]["num_blocks"] == scores["D"]["num_blocks"]  # the same anchors for every algorithm
    q = cache_quality(dspark, target, tmp_path / "held")
    assert scores["D"]["greedy_tau"] == q.greedy_tau and 1.0 <= q.greedy_tau <= 4.0
    assert len(scores["D"]["slot_accuracy"]) == 3 and q.num_blocks > 0 and q.probabilistic_tau is not None
    assert scores["D"]["draft_vocab_mass"] == q.draft_vocab_mass and 0.0 < q.draft_vocab_mass <= 1.0 + 1e-6
    assert json.loads((tmp_path / "out.json").read_text())["drafters"]["D"]["num_blocks"] == q.num_blocks
    with pytest.raises(FileNotFoundError, match="prepare-data --heldout"):
        cache_quality(dspark, target, tmp_path / "nowhere")

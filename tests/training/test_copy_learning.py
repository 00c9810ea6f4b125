"""Copying is learnable: a tiny drafter trained on sequences that repeat random n-grams predicts every block
slot of held-out loops (teacher-forced accuracy >= 0.9) — with lookup inputs. The paper's drafter, trained
the same way, learns to copy at most its first slot: target features let a block find where its anchor
occurred, but a parallel block has no way to step k tokens past that place (measured in BENCHMARKS.md).
Also the held-out metric itself against a hand-computed example."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.testing.tiny_configs import tiny_gemma3
from dspark_jax.drafters.factory import Drafter
from dspark_jax.training.heldout import teacher_forced_quality
from dspark_jax.models.transformer import Transformer
from dspark_jax.target import Target
from dspark_jax.training.forward import TrainBatch
from dspark_jax.training.cache_builder import build_target_cache
from dspark_jax.training.sequences import make_sequence
from dspark_jax.training.target_cache import TargetCache
from dspark_jax.training.forward import to_batch
from dspark_jax.training.trainer import TrainConfig, Trainer
from dspark_jax.testing.tiny_target import CharTokenizer

TAPS = (0, 1)


@pytest.fixture(scope="module")
def target():
    """A small random target (3 layers, d 64, head_dim 32): wide enough heads to match tokens by content."""
    cfg = dataclasses.replace(tiny_gemma3(num_layers=3), hidden_size=64, head_dim=32, num_heads=2, num_kv_heads=1,
                              intermediate_size=128, bos_token_id=2, eos_token_ids=(1,))
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    return Target(cfg, graphdef, state, CharTokenizer(), "tiny-64")


def loops(n: int, seed: int, length: int = 64):
    """BOS + a random n-gram (3..8 tokens) repeated; the loss is on everything after its first occurrence."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        period = int(rng.integers(3, 9))
        gram = [int(t) for t in rng.integers(3, 97, period)]
        seq = [2] + (gram * (length // period + 2))[:length - 1]
        out.append(make_sequence(seq[:1 + period], seq[1 + period:]))
    return out


@pytest.fixture(scope="module")
def caches(target, tmp_path_factory):
    root = tmp_path_factory.mktemp("loops")
    train = build_target_cache(target, loops(256, 0), root / "train", TAPS, dtype="float32", batch_size=64,
                               progress=False)
    held = build_target_cache(target, loops(32, 1), root / "heldout", TAPS, dtype="float32", batch_size=32,
                              progress=False)
    return TargetCache.open(train, layer_ids=TAPS), TargetCache.open(held, layer_ids=TAPS)


def train_and_score(target, caches, workdir, lookup_inputs: int):
    train, held = caches
    cfg = TrainConfig(algorithm="dspark", gamma=4, num_layers=1, markov_rank=16, draft_vocab_size=None,
                      target_layer_ids=TAPS, learning_rate=3e-3, warmup_fraction=0.05, epochs=1000, max_steps=800,
                      batch_size=8, num_anchors=16, max_len=64, seed=0, log_every=100, checkpoint_every=10 ** 6,
                      loss_weights=(1.0, 0.0, 0.0), lookup_inputs=lookup_inputs)  # CE: the data is not the target's
    drafter = Trainer(target, train, cfg, workdir).run(progress=False)
    batches = (to_batch(b, jnp.float32) for b in held.batches(8, 64, shuffle=False))
    return teacher_forced_quality(drafter, target, batches, num_anchors=32)


def test_copying_is_learned_with_lookup_inputs_and_not_without(target, caches, tmp_path):
    with_lookup = train_and_score(target, caches, tmp_path / "lookup", lookup_inputs=3)
    assert min(with_lookup.slot_accuracy) >= 0.9, with_lookup
    paper = train_and_score(target, caches, tmp_path / "paper", lookup_inputs=0)
    assert max(paper.slot_accuracy[1:]) < 0.6, paper  # later slots never learn to copy in this budget
    assert with_lookup.greedy_tau > 1.5 * paper.greedy_tau


def _stub_drafter(config, v: int, full_vocab: bool = True) -> Drafter:
    """A parameter-free drafter of `config` over draft tokens 0..v−1 (ids = target ids): for faked forwards."""
    class Stub(nnx.Module):
        vocab_size = v

        def __init__(self):
            self.config, self.full_vocab = config, full_vocab
            self.draft_to_target = nnx.Variable(jnp.arange(v))
            self.target_to_draft = nnx.Variable(jnp.arange(v))

    return Drafter(config, *nnx.split(Stub()), "stub")


def _example():
    """The hand-computed example's (empty target, batch): tokens 2 3 4 3 4 3, loss from position 2."""
    empty = Target(tiny_gemma3(), *nnx.split(nnx.Module()), CharTokenizer(), "stub")
    batch = TrainBatch(tokens=jnp.asarray([[2, 3, 4, 3, 4, 3]]), loss_mask=jnp.asarray([[0, 0, 1, 1, 1, 1]]),
                       features=jnp.zeros((1, 6, 2)), last_hidden=jnp.zeros((1, 6, 2)), target_lse=jnp.zeros((1, 6)))
    return empty, batch


def _assert_hand_computed(q) -> None:
    np.testing.assert_allclose(q.slot_accuracy, [1.0, 0.5, 1.0])  # 2/2, 1/2, 1/1
    assert q.greedy_tau == pytest.approx(((1 + 1) + (1 + 1 + 1)) / 2)  # anchor 2: 1 + 1; anchor 3: 1 + 2
    # p_d = softmax(10·one-hot) puts m on the drafted token; against p_t = 0.2 each, 1 − TV = 1 − (m − 0.2)
    m = float(np.exp(10) / (np.exp(10) + 4))
    c = 1 - (m - 0.2)
    assert q.probabilistic_tau == pytest.approx(((1 + c + c ** 2 + c ** 3) + (1 + c + c ** 2)) / 2, rel=1e-5)
    assert q.num_blocks == 2
    assert q.draft_vocab_mass == pytest.approx(1.0)  # a full-vocabulary drafter covers every token


def test_teacher_forced_metric_against_a_hand_computed_example(monkeypatch):
    """A stub drafter whose draft tokens are fixed: accuracy per slot, greedy τ (prefix products of right
    slots) and probabilistic τ (prefix products of 1 − TV) computed by hand for two blocks of one sequence."""
    import jax

    from dspark_jax.training import heldout as tf
    from dspark_jax.training.anchors import build_blocks

    g, v = 3, 5
    config = dataclasses.replace(TrainConfig(algorithm="dflash").drafter_config(tiny_gemma3()), block_size=g)
    # tokens 2 3 4 3 4 3, loss from position 2: anchors 2 and 3 have labels [3, 4, 3] and [4, 3, (none)]
    # drafted: anchor 2 -> [3, 0, 3] (slot 1 wrong), anchor 3 -> [4, 3, 0] (its slot 2 is unsupervised)
    logits = 10.0 * jnp.eye(v)[jnp.asarray([[[3, 0, 3], [4, 3, 0]]])]

    def fake_block_outputs(drafter, target_model, batch, key, num_anchors):
        blocks = jax.vmap(build_blocks, in_axes=(0, 0, 0, 0, None, None))(
            batch.tokens, batch.loss_mask.astype(bool), jnp.asarray([[2, 3]]), jnp.asarray([[True, True]]), g, 0)
        return blocks, logits, jnp.zeros((1, 2, g)), None

    monkeypatch.setattr(tf, "block_outputs", fake_block_outputs)
    monkeypatch.setattr(tf, "target_block_logits",  # a uniform target over the 5 tokens
                        lambda drafter, target_model, batch, blocks: (jnp.zeros((1, 2, g, v)), jnp.zeros((1, 2, g))))
    empty, batch = _example()
    _assert_hand_computed(teacher_forced_quality(_stub_drafter(config, v), empty, [batch], num_anchors=8))

    # the same 5 draft tokens out of a target vocabulary whose full mass is e^0 · 10
    monkeypatch.setattr(tf, "target_block_logits", lambda drafter, target_model, batch, blocks: (
        jnp.zeros((1, 2, g, v)), jnp.full((1, 2, g), np.log(10.0))))
    q = teacher_forced_quality(_stub_drafter(config, v, full_vocab=False), empty, [batch], num_anchors=8)
    assert q.draft_vocab_mass == pytest.approx(0.5, rel=1e-5)  # 5 of 10 equally likely tokens, every slot
    assert q.as_dict()["heldout/draft_vocab_mass"] == q.draft_vocab_mass


def test_eagle3_teacher_forced_metric_against_the_same_hand_computed_example(monkeypatch):
    """The Eagle3 path (`_ttt_counts`) on the example above: query rows 1 and 2 (anchors 2 and 3), step k of
    row i predicting x_{i+k+2}, the same drafts and uniform target — the same accuracy and τ."""
    import jax

    from dspark_jax.training import heldout as tf

    g, v = 3, 5
    config = dataclasses.replace(TrainConfig(algorithm="eagle3", markov_rank=0).drafter_config(tiny_gemma3()),
                                 block_size=g)
    drafted = jnp.asarray([[[3, 0, 3], [4, 3, 0]]])                                   # [B, A, S]
    log_probs = jnp.moveaxis(jax.nn.log_softmax(10.0 * jnp.eye(v)[drafted], axis=-1), 2, 0)  # [S, B, A, V]
    masks = jnp.asarray([[[True, True]], [[True, True]], [[True, False]]])             # row 2 predicts x_6 at step 2
    calls = []

    def fake_outputs(drafter, target_model, batch, ttt_length, queries):
        calls.append((ttt_length, queries[0].shape))
        return log_probs, jnp.full((g, 1, 2, v), 0.2), masks

    monkeypatch.setattr(tf, "ttt_query_rows", lambda key, loss_mask, n: (jnp.asarray([[1, 2]]),
                                                                        jnp.asarray([[True, True]])))
    monkeypatch.setattr(tf, "eagle3_ttt_outputs", fake_outputs)
    empty, batch = _example()
    q = teacher_forced_quality(_stub_drafter(config, v), empty, [batch], num_anchors=8)
    assert calls == [(g, (1, 2))]  # γ TTT steps at the sampled rows
    _assert_hand_computed(q)

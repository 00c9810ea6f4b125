"""Drafter training end to end on a tiny target: loss falls, resume equals the uninterrupted run, the
target is never updated, the exported drafter loads and decodes losslessly."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.decoding.autoregressive import generate
from dspark_jax.sampling import SamplingParams
from dspark_jax.target import Target
from dspark_jax.training.cache_builder import build_target_cache
from dspark_jax.training.sequences import make_sequence
from dspark_jax.training.target_cache import TargetCache
from dspark_jax.training.trainer import TrainConfig, Trainer
from dspark_jax.testing.tiny_target import make_tiny_target


@pytest.fixture(scope="module")
def target():
    return make_tiny_target()


@pytest.fixture(scope="module")
def cache(target, tmp_path_factory):
    """Greedy continuations of the target itself (learnable: the drafter imitates the target)."""
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 97, size=rng.integers(3, 9))) for _ in range(16)]
    width = 16
    toks = np.zeros((16, width), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    out = generate(target.graphdef, target.state, jnp.asarray(toks), jnp.asarray([len(p) for p in prompts]),
                   jax.random.key(0), SamplingParams.create(16), max_new_tokens=24, stop_ids=())
    seqs = [make_sequence(p, np.asarray(out.tokens[i]).tolist()) for i, p in enumerate(prompts)]
    path = build_target_cache(target, seqs, tmp_path_factory.mktemp("cache"), (0, 2), dtype="float32",
                              batch_size=8, progress=False)
    return TargetCache.open(path, target_config=target.config, layer_ids=(0, 2))


CFG = TrainConfig(algorithm="dspark", gamma=4, num_layers=1, markov_rank=8, draft_vocab_size=None,
                  target_layer_ids=(0, 2), learning_rate=3e-3, warmup_fraction=0.1, epochs=4, batch_size=4,
                  num_anchors=8, max_len=32, seed=0, log_every=1, checkpoint_every=3, keep_checkpoints=2)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_loss_falls_and_target_is_frozen(target, cache, tmp_path):
    before = _leaves(target.state)
    trainer = Trainer(target, cache, dataclasses.replace(CFG, epochs=6), tmp_path)
    drafter = trainer.run(progress=False)
    import json
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.8 * first, (first, last)
    assert rows[-1]["tau_probabilistic"] > rows[0]["tau_probabilistic"]
    for a, b in zip(before, _leaves(target.state)):
        np.testing.assert_array_equal(a, b)
    # the drafter owns no embedding or LM head: those stay the target's
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(drafter.state)}
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())
    run = json.loads((tmp_path / "run.json").read_text())  # what the run trained on, for learning curves
    assert run["data"] == {"sequences": len(cache), "response_tokens": int(cache.num_loss_tokens)}


def test_heldout_quality_is_logged_and_rises(target, cache, tmp_path):
    """With a held-out cache the trainer logs teacher-forced slot accuracy and τ every heldout_every steps
    (metrics.jsonl and TensorBoard) and at the end; training on the target's own outputs improves them."""
    import json
    cfg = dataclasses.replace(CFG, epochs=6, heldout_every=4)
    Trainer(target, cache, cfg, tmp_path, heldout=cache).run(progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in rows if "heldout/greedy_tau" in r]
    assert [r["micro_step"] for r in held] == [4, 8, 12, 16, 20, 24]
    assert {f"heldout/slot_accuracy@{k}" for k in range(CFG.gamma)} <= set(held[0])
    assert held[-1]["heldout/greedy_tau"] > held[0]["heldout/greedy_tau"]
    assert held[-1]["heldout/probabilistic_tau"] > held[0]["heldout/probabilistic_tau"]


def test_several_heldout_caches_are_logged_under_their_names(target, cache, tmp_path):
    """A mapping of held-out caches (greedy and T = 1 outputs, say) logs each under its own prefix; the same
    cache under two names scores the same (one anchor key per evaluation, whatever the name)."""
    import json
    cfg = dataclasses.replace(CFG, epochs=1, heldout_every=4)
    Trainer(target, cache, cfg, tmp_path, heldout={"heldout": cache, "heldout_t1": cache}).run(progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in rows if "heldout/greedy_tau" in r]
    assert held and all(r["heldout_t1/greedy_tau"] == r["heldout/greedy_tau"] for r in held)
    assert all(r["heldout_t1/probabilistic_tau"] == r["heldout/probabilistic_tau"] for r in held)
    with pytest.raises(ValueError, match="without '/'"):
        Trainer(target, cache, cfg, tmp_path / "bad", heldout={"a/b": cache})


def test_heldout_summary_names_each_cache():
    from dspark_jax.training.trainer import heldout_summary
    held = {"heldout/greedy_tau": 2.0, "heldout/slot_accuracy@0": 0.5, "heldout/slot_accuracy@5": 0.1,
            "heldout_t1/greedy_tau": 1.25}
    assert heldout_summary(held) == "held-out greedy_tau 2.000, slot_accuracy@0 0.500; heldout_t1 greedy_tau 1.250"


def test_resume_after_interrupt_equals_uninterrupted_run(target, cache, tmp_path):
    full = Trainer(target, cache, CFG, tmp_path / "full").run(progress=False)
    first = Trainer(target, cache, CFG, tmp_path / "split")
    first.run(progress=False, stop_at_micro_step=5)
    assert first.micro_step == 5
    resumed_trainer = Trainer(target, cache, CFG, tmp_path / "split")  # a new process would do exactly this
    resumed = resumed_trainer.run(progress=False)
    assert resumed_trainer.micro_step == full_micro(cache)
    for a, b in zip(_leaves(full.state), _leaves(resumed.state)):
        np.testing.assert_array_equal(a, b)


def full_micro(cache):
    return CFG.epochs * (len(cache) // CFG.batch_size)


def assert_decodes_like_plain(target, drafter):
    """Greedy speculative decoding with `drafter` equals plain greedy decoding; returns the speculative output."""
    from dspark_jax.decoding.speculative import speculative_generate
    tokens = jnp.asarray([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]], jnp.int32)
    lens = jnp.asarray([4, 6])
    kw = dict(max_new_tokens=16, stop_ids=())
    ar = generate(target.graphdef, target.state, tokens, lens, jax.random.key(0), SamplingParams.create(2), **kw)
    sp = speculative_generate(target.graphdef, target.state, drafter.graphdef, drafter.state, tokens, lens,
                              jax.random.key(0), SamplingParams.create(2), jnp.float32(0.0), **kw)
    np.testing.assert_array_equal(np.asarray(sp.tokens), np.asarray(ar.tokens))
    return sp


def test_exported_drafter_decodes_losslessly(target, cache, tmp_path):
    from dspark_jax.drafters.checkpoint import save_drafter
    from dspark_jax.drafters.factory import load_drafter
    trained = Trainer(target, cache, dataclasses.replace(CFG, epochs=1), tmp_path).run(progress=False)
    save_drafter(nnx.merge(trained.graphdef, trained.state), tmp_path / "drafter")
    assert_decodes_like_plain(target, load_drafter(str(tmp_path / "drafter"), target))


def test_drafter_for_another_target_is_rejected(target, tmp_path):
    from dspark_jax.drafters.checkpoint import DrafterFileError, load_drafter_module, save_drafter
    from dspark_jax.drafters.config import make_drafter_config
    from dspark_jax.drafters.dspark import DSparkDrafter
    dc = make_drafter_config("dspark", target.config, block_size=4, num_layers=1, markov_rank=8)
    save_drafter(DSparkDrafter(dc, target.config, rngs=nnx.Rngs(0)), tmp_path / "d")
    other = dataclasses.replace(target.config, hidden_size=48)
    with pytest.raises(DrafterFileError, match="trained for target"):
        load_drafter_module(tmp_path / "d", other)
    (tmp_path / "d" / "drafter.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(DrafterFileError, match="unreadable or truncated"):
        load_drafter_module(tmp_path / "d", target.config)


def test_invalid_train_config_values():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    assert TrainConfig(algorithm="eagle3").ttt_length == 7


def test_run_directory_of_another_target_is_refused(target, cache, tmp_path):
    Trainer(target, cache, dataclasses.replace(CFG, epochs=1), tmp_path)
    other_cfg = dataclasses.replace(target.config, rms_norm_eps=1e-5)
    other = Target(other_cfg, target.graphdef, target.state, target.tokenizer, "other")
    with pytest.raises(ValueError, match="holds a run for target"):
        Trainer(other, cache, dataclasses.replace(CFG, epochs=1), tmp_path)


def test_online_mode_step_equals_cached_step(target, cache, tmp_path):
    """Without a feature cache the step runs the target itself and computes the same loss."""
    from dspark_jax.training.cache_builder import build_sequence_cache
    from dspark_jax.training.forward import to_batch
    from dspark_jax.training.trainer import init_drafter, loss_fn
    seqs = [make_sequence(list(s["tokens"][s["loss_mask"] == 0]), list(s["tokens"][s["loss_mask"] == 1]))
            for s in (cache.sample(i) for i in range(len(cache)))]
    online = TargetCache.open(build_sequence_cache(target, seqs, tmp_path / "seq", progress=False),
                              target_config=target.config)
    graphdef, params, rest = nnx.split(init_drafter(target, cache, CFG), nnx.Param, ...)
    args = (params, rest, graphdef, target.graphdef, target.state)
    cached_batch = next(cache.batches(4, 32, seed=0, epoch=0))
    online_batch = next(online.batches(4, 32, seed=0, epoch=0))
    np.testing.assert_array_equal(cached_batch["tokens"], online_batch["tokens"])
    a, ma = loss_fn(*args, to_batch(cached_batch, jnp.float32), jax.random.key(1), CFG, jnp.float32)
    b, mb = loss_fn(*args, to_batch(online_batch, jnp.float32), jax.random.key(1), CFG, jnp.float32)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-4)
    np.testing.assert_allclose(float(ma["tau_probabilistic"]), float(mb["tau_probabilistic"]), rtol=1e-4)


def test_train_batch_checks_shapes_at_the_jit_boundary():
    from dspark_jax.training.forward import TrainBatch
    tokens = jnp.zeros((2, 5), jnp.int32)
    good = TrainBatch(tokens=tokens, loss_mask=jnp.ones((2, 5), jnp.int32), features=jnp.zeros((2, 5, 12)),
                      last_hidden=jnp.zeros((2, 5, 4)), target_lse=jnp.zeros((2, 5)), lengths=jnp.full((2,), 5))
    good.check()
    TrainBatch(tokens=tokens, loss_mask=jnp.ones((2, 5), jnp.int32), features=None, last_hidden=None,
               target_lse=None).check()  # online mode: no features
    for bad in (dict(loss_mask=jnp.ones((2, 4), jnp.int32)), dict(features=jnp.zeros((2, 4, 12))),
                dict(target_lse=jnp.zeros((2,))), dict(lengths=jnp.full((3,), 5)), dict(tokens=tokens.astype(float))):
        with pytest.raises(AssertionError):
            dataclasses.replace(good, **bad).check()

"""Sharded vs unsharded runs on 8 simulated CPU devices, for tests/parallel/test_sharding.py.

The device count is fixed when JAX starts, so this runs in its own process:
    python tests/sharding_checks.py WORKDIR
and prints one JSON object: per mesh, whether greedy speculative generation matched the single-device
run token for token, how the weights were split, and the largest parameter difference after drafter
training steps.
"""
from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from dspark_jax import generation  # noqa: E402
from dspark_jax.utils.compile_cache import enable_compilation_cache  # noqa: E402
from dspark_jax.decoding.autoregressive import generate  # noqa: E402
from dspark_jax.sampling import SamplingParams  # noqa: E402
from dspark_jax.drafters.config import make_drafter_config  # noqa: E402
from dspark_jax.drafters.dspark import DSparkDrafter  # noqa: E402
from dspark_jax.drafters.factory import Drafter  # noqa: E402
from dspark_jax.parallel import make_mesh, shard_state  # noqa: E402
from dspark_jax.models.transformer import abstract_model, canonical_layout, model_from_canonical  # noqa: E402
from dspark_jax.parallel.rules import state_shardings  # noqa: E402
from dspark_jax.target import Target  # noqa: E402
from dspark_jax.training.cache_builder import build_target_cache  # noqa: E402
from dspark_jax.training.sequences import make_sequence  # noqa: E402
from dspark_jax.training.target_cache import TargetCache  # noqa: E402
from dspark_jax.training.trainer import TrainConfig, Trainer  # noqa: E402
from dspark_jax.testing.oracle_drafter import OracleDrafter  # noqa: E402
from dspark_jax.testing.tiny_target import make_tiny_target  # noqa: E402

PROMPTS = ["hello", "sharded decoding", "a", "the same tokens", "x y z"]  # 5: the data axis pads the batch


def make_target() -> Target:
    # mlp 64, heads 4x8, kv heads 2x8 split over model=4; the vocabulary of 97 is replicated (not divisible)
    return make_tiny_target(num_layers=2)


def make_drafter(target: Target) -> Drafter:
    vocab = np.arange(0, 96, 2)  # 48 draft tokens: split over model=4
    dc = make_drafter_config("dspark", target.config, block_size=4, num_layers=1, markov_rank=8,
                             draft_vocab_size=len(vocab))
    graphdef, state = nnx.split(DSparkDrafter(dc, target.config, rngs=nnx.Rngs(1), draft_vocab_ids=vocab))
    return Drafter(dc, graphdef, state, "random")


def split_of(state: nnx.State, *path) -> dict:
    """Global and per-device shape and the PartitionSpec of one variable."""
    arr = dict(nnx.to_flat_state(state))[path].get_value()
    return dict(shape=list(arr.shape), shard=list(arr.addressable_shards[0].data.shape), spec=str(arr.sharding.spec))


def run_generation(target: Target, drafter: Drafter | None, spec: str | None, prompts=PROMPTS) -> tuple[list, dict]:
    """(token ids, rounds, accept length) per prompt and, for a mesh, how the compiled program was sharded."""
    cfg = generation.GenerationConfig(max_new_tokens=24, batch_size=5)
    generation._EXECUTABLES.clear()
    results = generation.generate_text(target, prompts, cfg, drafter=drafter, mesh=spec and make_mesh(spec))
    info = {}
    if spec:
        (compiled,) = generation._EXECUTABLES.values()
        info = dict(input_specs=sorted({str(s.spec) for s in jax.tree.leaves(compiled.input_shardings)}),
                    all_reduce="all-reduce" in compiled.as_text())
    return [(r.completion_ids, r.rounds, r.mean_accept_len) for r in results], info


def check_generation(target: Target, drafter: Drafter) -> dict:
    """DSpark drafter (no acceptance: random) under tensor + data parallelism; the oracle drafter (every
    draft accepted) under data parallelism; plain decoding under data parallelism."""
    oracle_graphdef, oracle_state = nnx.split(OracleDrafter(4, target.config.vocab_size))
    oracle = Drafter(None, oracle_graphdef, oracle_state, "oracle")
    out = {}
    cases = (("dspark", "data=2,model=4", drafter, PROMPTS), ("oracle", "data=8", oracle, PROMPTS),
             ("autoregressive", "data=8", None, PROMPTS[:2]))
    for name, spec, d, prompts in cases:
        ref, _ = run_generation(target, d, None, prompts)
        got, info = run_generation(target, d, spec, prompts)
        out[f"{name}@{spec}"] = dict(info, equal=got == ref, accept_len=[r[2] for r in got])
    return out


def make_cache(target: Target, workdir: Path) -> TargetCache:
    """A target cache of 8 greedy continuations (taps: embedding output and layer 0)."""
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 97, size=rng.integers(3, 9))) for _ in range(8)]
    toks = np.zeros((8, 16), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    gen = generate(target.graphdef, target.state, jnp.asarray(toks), jnp.asarray([len(p) for p in prompts]),
                   jax.random.key(0), SamplingParams.create(8), max_new_tokens=12, stop_ids=())
    seqs = [make_sequence(p, np.asarray(gen.tokens[i]).tolist()) for i, p in enumerate(prompts)]
    path = build_target_cache(target, seqs, workdir / "cache", (-1, 0), dtype="float32", batch_size=8, progress=False)
    return TargetCache.open(path, target_config=target.config, layer_ids=(-1, 0))


# 8 sequences, batch 8, 2 epochs: two optimizer steps
TRAIN = TrainConfig(algorithm="dspark", gamma=4, num_layers=1, markov_rank=8, draft_vocab_size=48,
                    target_layer_ids=(-1, 0), learning_rate=3e-3, warmup_fraction=0.0, epochs=2, batch_size=8,
                    num_anchors=4, max_len=24, seed=0, log_every=1, checkpoint_every=100, keep_checkpoints=1)


def check_training(target: Target, workdir: Path) -> dict:
    """Data parallel, and FSDP + tensor parallel, against one device: losses, parameters, layouts."""
    cache = make_cache(target, workdir)
    ref = Trainer(target, cache, TRAIN, workdir / "ref").run(progress=False)
    ref_loss = [json.loads(x)["loss"] for x in (workdir / "ref" / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for spec, fsdp in (("data=8", False), ("data=2,model=4", True)):
        name = f"{spec}{',fsdp' if fsdp else ''}"
        trainer = Trainer(target, cache, TRAIN, workdir / name.replace(",", "_"), mesh=make_mesh(spec), fsdp=fsdp)
        q_proj = ("layers", 0, "self_attn", "q_proj")
        split = dict(fc=split_of(trainer.params, "fc"), q_proj=split_of(trainer.params, *q_proj),
                     target_q_proj=split_of(trainer.target_state, *q_proj))
        got = trainer.run(progress=False)
        split["q_proj_after"] = split_of(got.state, *q_proj)
        loss = [json.loads(x)["loss"] for x in (trainer.workdir / "metrics.jsonl").read_text().splitlines()]
        diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(ref.state), jax.tree.leaves(got.state))]
        out[name] = dict(max_param_diff=max(diffs), loss=loss, ref_loss=ref_loss, steps=trainer.micro_step,
                         split=split)
    return out


def check_loading(target: Target, mesh) -> dict:
    """Canonical tensors placed straight onto their shardings while the model is built (`load_target(mesh=...)`):
    the same values as the single-device model, laid out as `shard_state` lays it out."""
    tensors = {}

    def record(spec, value):
        tensors[spec.name] = np.asarray(value).T if spec.transpose else np.asarray(value)

    jax.tree.map(record, canonical_layout(target.config), nnx.to_pure_dict(target.state))
    shardings = state_shardings(nnx.state(abstract_model(target.config, jnp.float32)), mesh)
    loaded = nnx.state(model_from_canonical(target.config, tensors, jnp.float32, shardings))
    equal = all(np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(target.state)))
    return dict(equal=equal, q_proj=split_of(loaded, "layers", 0, "self_attn", "q_proj"),
                embed=split_of(loaded, "embed_tokens"))


def main(workdir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    enable_compilation_cache()  # the suite's cache ($DSPARK_XLA_CACHE): a rerun reads its programs back
    target = make_target()
    drafter = make_drafter(target)
    mesh = make_mesh("data=2,model=4")
    weights = dict(target_q_proj=split_of(shard_state(target.state, mesh), "layers", 0, "self_attn", "q_proj"),
                   target_embed=split_of(shard_state(target.state, mesh), "embed_tokens"),
                   drafter_markov_w2=split_of(shard_state(drafter.state, mesh), "markov", "w2"))
    result = dict(weights=weights, loading=check_loading(target, mesh), generation=check_generation(target, drafter),
                  training=check_training(target, Path(workdir)))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])

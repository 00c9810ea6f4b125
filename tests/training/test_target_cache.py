"""Target cache: contents equal a direct forward of the target, bf16 storage, layer selection, manifest
validation, resume, batching; response -> sequence conversion; the prepare-data pipeline and CLI."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dspark_jax.testing.tiny_configs import tiny_gemma3, tiny_qwen3
from dspark_jax.models.kv_cache import init_cache
from dspark_jax.models.transformer import Transformer
from dspark_jax.target import Target
from dspark_jax.training import cache_builder, cache_format, sequences
from dspark_jax.training.cache_builder import build_target_cache
from dspark_jax.training.sequences import Sequence
from dspark_jax.training.target_cache import TargetCache

LAYERS = (-1, 0, 2)  # tiny_gemma3 has 4 layers: embedding output, first and penultimate layer
LENGTHS = (5, 17, 40, 33, 9)


class FakeTokenizer:
    """Characters -> ids in [5, 95); no stop tokens (responses run to max_new_tokens)."""
    vocab_size = 97
    stop_ids = ()

    def encode(self, text, add_bos=True):
        return ([2] if add_bos else []) + [5 + ord(c) % 90 for c in text]


@pytest.fixture(scope="module")
def target():
    cfg = tiny_gemma3()
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    return Target(config=cfg, graphdef=graphdef, state=state, tokenizer=FakeTokenizer(), source="tiny-random")


def make_sequences(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        prompt = max(1, n // 3)
        mask = np.zeros(n, np.uint8)
        mask[prompt:] = 1
        out.append(Sequence(rng.integers(0, 97, n).astype(np.int32), mask))
    return out


def direct(target, seq, layers=LAYERS):
    """Unbatched, unpadded forward: (features [T, m*d], last hidden [T, d], lse [T] at loss positions else 0)."""
    model = target.model
    t = len(seq)
    out = model(jnp.asarray(seq.tokens)[None], jnp.arange(t, dtype=jnp.int32)[None],
                init_cache(model.config, 1, t), jnp.zeros((1,), jnp.int32), tap_layers=layers)
    lse = jax.nn.logsumexp(model.logits(out.hidden[0]), axis=-1)
    lse = np.where(seq.loss_mask == 1, np.asarray(lse), 0.0)
    return np.asarray(jnp.concatenate(out.taps, -1)[0]), np.asarray(out.hidden[0]), lse


@pytest.fixture(scope="module")
def cache_f32(target, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "f32"
    # 50-token shards -> several shards; 8-row logit chunks -> several chunks per batch
    build_target_cache(target, make_sequences(), path, LAYERS, dtype="float32", batch_size=2,
                       shard_max_tokens=50, progress=False, lse_chunk=8)
    return path


@pytest.fixture(scope="module")
def cache_bf16(target, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "bf16"
    build_target_cache(target, make_sequences(), path, LAYERS, dtype="bfloat16", batch_size=2,
                       shard_max_tokens=50, progress=False, lse_chunk=8)
    return path


@pytest.fixture(scope="module")
def reference(target):
    return [direct(target, s) for s in make_sequences()]


def test_cache_equals_direct_forward(cache_f32, reference):
    cache = TargetCache.open(cache_f32)
    seqs = make_sequences()
    assert len(cache) == len(seqs) and cache.num_tokens == sum(LENGTHS)
    assert len(cache.manifest["shards"]) > 1
    assert cache.num_loss_tokens == sum(s.num_loss_tokens for s in seqs)
    for i, (seq, (feats, hidden, lse)) in enumerate(zip(seqs, reference)):
        s = cache.sample(i)
        np.testing.assert_array_equal(s["tokens"], seq.tokens)
        np.testing.assert_array_equal(s["loss_mask"], seq.loss_mask)
        assert s["features"].dtype == np.float32 and s["features"].shape == (len(seq), 3 * 32)
        np.testing.assert_allclose(s["features"], feats, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s["last_hidden"], hidden, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s["target_lse"], lse, rtol=1e-5, atol=1e-5)
        assert np.all(s["target_lse"][seq.loss_mask == 0] == 0) and np.all(s["target_lse"][seq.loss_mask == 1] > 0)


def test_bfloat16_storage_round_trip(cache_bf16, reference):
    shard = cache_bf16 / "shard-00000"
    assert np.load(shard / "features.npy", mmap_mode="r").dtype == np.uint16
    assert json.loads((cache_bf16 / "manifest.json").read_text())["dtype"] == "bfloat16"
    cache = TargetCache.open(cache_bf16)
    for i, (feats, hidden, lse) in enumerate(reference):
        s = cache.sample(i)
        assert s["features"].dtype == np.float32
        np.testing.assert_allclose(s["features"], feats, rtol=2 ** -7, atol=1e-6)
        np.testing.assert_allclose(s["last_hidden"], hidden, rtol=2 ** -7, atol=1e-6)
        np.testing.assert_allclose(s["target_lse"], lse, rtol=1e-5)  # computed in float32 on device
        raw = cache.sample(i, as_float32=False)
        assert raw["features"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(raw["features"].astype(np.float32), s["features"])
    # Gemma-scale values survive (float16 would overflow at 65504)
    x = np.array([8.0e4, -1.5e5, 3.14159, 1e-30, 0.0], np.float32)
    bits = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(cache_format.decode_bf16(bits), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_allclose(cache_format.decode_bf16(bits), x, rtol=2 ** -8)


@pytest.mark.parametrize("subset", [(0,), (-1, 2), (2,)])
def test_layer_subset(cache_f32, subset):
    full = TargetCache.open(cache_f32)
    part = TargetCache.open(cache_f32, layer_ids=subset)
    assert part.layer_ids == subset and part.cached_layer_ids == LAYERS
    d = 32
    for i in (0, 3):
        f = full.sample(i)["features"].reshape(LENGTHS[i], len(LAYERS), d)
        want = np.concatenate([f[:, LAYERS.index(l)] for l in subset], -1)
        np.testing.assert_array_equal(part.sample(i)["features"], want)
    b = next(part.batches(2, 16, seed=0, epoch=0))
    assert b["features"].shape == (2, 16, len(subset) * d)


def test_validation_errors(target, cache_f32, tmp_path):
    with pytest.raises(ValueError, match="manifest.json: no manifest"):
        TargetCache.open(tmp_path)
    TargetCache.open(cache_f32, target_config=target.config)  # matches
    with pytest.raises(ValueError, match="another target"):
        TargetCache.open(cache_f32, target_config=tiny_qwen3())
    with pytest.raises(ValueError, match="another target"):
        TargetCache.open(cache_f32, target_config=tiny_gemma3(num_layers=6))
    with pytest.raises(ValueError, match=r"layer ids \[1\] are not cached"):
        TargetCache.open(cache_f32, layer_ids=[0, 1])
    with pytest.raises(ValueError, match="float16"):
        build_target_cache(target, make_sequences(), tmp_path / "x", LAYERS, dtype="float16", progress=False)
    with pytest.raises(ValueError, match="float16"):
        cache_format.estimate_cache_bytes(10, 5, 640, "float16")
    with pytest.raises(ValueError, match="cannot be tapped"):
        build_target_cache(target, make_sequences(), tmp_path / "x", (0, 3), progress=False)
    with pytest.raises(ValueError, match="outside"):
        build_target_cache(target, [Sequence(np.array([1, 200], np.int32), np.ones(2, np.uint8))],
                           tmp_path / "x", LAYERS, progress=False)

    broken = tmp_path / "broken"
    shutil.copytree(cache_f32, broken)
    feats = broken / "shard-00001" / "features.npy"
    feats.write_bytes(feats.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match=r"shard-00001/features\.npy"):
        TargetCache.open(broken)
    (broken / "shard-00001" / "features.npy").unlink()
    with pytest.raises(ValueError, match=r"shard-00001/features\.npy: missing"):
        TargetCache.open(broken)
    manifest = broken / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(ValueError, match="corrupted manifest"):
        TargetCache.open(broken)
    m = json.loads((cache_f32 / "manifest.json").read_text())
    manifest.write_text(json.dumps(dict(m, version=99)))
    with pytest.raises(ValueError, match="unsupported cache version 99"):
        TargetCache.open(broken)


def _snapshot(path):
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_resume_after_interruption(target, cache_f32, tmp_path):
    path = tmp_path / "cache"
    shutil.copytree(cache_f32, path)
    before = _snapshot(path)
    kept_mtime = (path / "shard-00000" / "features.npy").stat().st_mtime_ns
    (path / "manifest.json").unlink()
    shutil.rmtree(path / "shard-00001")
    (path / "shard-00002.tmp").mkdir()  # a half-written shard of the interrupted run
    (path / "shard-00002.tmp" / "tokens.npy").write_bytes(b"garbage")
    build_target_cache(target, make_sequences(), path, LAYERS, dtype="float32", batch_size=2,
                       shard_max_tokens=50, progress=False, lse_chunk=8)
    after = _snapshot(path)
    assert (path / "shard-00000" / "features.npy").stat().st_mtime_ns == kept_mtime  # skipped, not rewritten
    assert not (path / "shard-00002.tmp").exists()
    assert set(after) == set(before)
    for name in before:
        if name != "manifest.json":
            assert after[name] == before[name], name
    strip = lambda m: {**m, "settings": {k: v for k, v in m["settings"].items() if k != "created_utc"}}  # noqa: E731
    assert strip(json.loads(after["manifest.json"])) == strip(json.loads(before["manifest.json"]))
    # a complete cache is left alone; other sequences or settings are refused
    build_target_cache(target, make_sequences(), path, LAYERS, dtype="float32", batch_size=2,
                       shard_max_tokens=50, progress=False, lse_chunk=8)
    assert _snapshot(path) == after
    with pytest.raises(ValueError, match="other sequences or settings"):
        build_target_cache(target, make_sequences(seed=1), path, LAYERS, dtype="float32", shard_max_tokens=50,
                           progress=False)
    (path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="shard-00000 was built from other"):
        build_target_cache(target, make_sequences(), path, LAYERS, dtype="bfloat16", shard_max_tokens=50,
                           progress=False)


def test_cache_grows_by_appending(target, cache_f32, reference, tmp_path):
    """More sequences appended to a finished cache's: its shards are kept, only the new sequences are computed."""
    path = tmp_path / "cache"
    shutil.copytree(cache_f32, path)
    before = _snapshot(path)
    extra = make_sequences(lengths=(12, 30), seed=7)
    build_target_cache(target, make_sequences() + extra, path, LAYERS, dtype="float32", batch_size=2,
                       shard_max_tokens=50, progress=False, lse_chunk=8)
    after = _snapshot(path)
    assert all(after[name] == data for name, data in before.items() if name != "manifest.json")
    cache = TargetCache.open(path)
    assert len(cache) == len(LENGTHS) + 2
    for i, (feats, hidden, lse) in enumerate(reference + [direct(target, s) for s in extra]):
        s = cache.sample(i)
        np.testing.assert_allclose(s["features"], feats, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(s["target_lse"], lse, rtol=2e-5, atol=2e-5)
    # sequences that do not extend the cached ones are refused, nothing written
    with pytest.raises(ValueError, match="shard-00000 was built from other"):
        build_target_cache(target, make_sequences()[1:] + extra, path, LAYERS, dtype="float32", batch_size=2,
                           shard_max_tokens=50, progress=False, lse_chunk=8)
    assert _snapshot(path) == after


def test_shrunk_sequences_refused_before_any_work(target, cache_f32, tmp_path):
    """Sequences that end at a shard boundary of a finished cache (a response file dropped) would leave the later
    shards beyond the new manifest, to break a later append: refused, naming the shard, nothing written."""
    path = tmp_path / "cache"
    shutil.copytree(cache_f32, path)
    before = _snapshot(path)
    shards = json.loads((path / "manifest.json").read_text())["shards"]
    assert len(shards) >= 2
    first = shards[0]["num_samples"]
    with pytest.raises(ValueError, match=r"shard-00001 was built from other sequences.*not part of this cache"):
        build_target_cache(target, make_sequences()[:first], path, LAYERS, dtype="float32", batch_size=2,
                           shard_max_tokens=50, progress=False, lse_chunk=8)
    assert _snapshot(path) == before


def test_batches(cache_f32):
    cache = TargetCache.open(cache_f32)
    epoch = lambda e, **kw: list(cache.batches(2, 20, seed=3, epoch=e, **kw))  # noqa: E731
    a, b, c = epoch(0), epoch(0), epoch(1)
    order = lambda bs: [int(i) for x in bs for i in x["indices"] if i >= 0]  # noqa: E731
    assert order(a) == order(b) and sorted(order(a)) == list(range(len(cache)))
    assert order(a) != order(c) or order(a) != order(epoch(2))
    assert len(a) == 3 and list(a[-1]["indices"]).count(-1) == 1  # 5 samples: last batch has a filler row
    assert len(epoch(0, drop_last=True)) == 2
    for batch in a:
        assert batch["tokens"].shape == (2, 20) and batch["features"].shape == (2, 20, 96)
        for r, i in enumerate(batch["indices"]):
            n = batch["lengths"][r]
            if i < 0:
                assert n == 0 and not batch["loss_mask"][r].any() and not batch["features"][r].any()
                continue
            s = cache.sample(int(i))
            assert n == min(LENGTHS[i], 20)
            np.testing.assert_array_equal(batch["tokens"][r, :n], s["tokens"][:n])
            np.testing.assert_array_equal(batch["features"][r, :n], s["features"][:n])
            np.testing.assert_array_equal(batch["target_lse"][r, :n], s["target_lse"][:n])
            assert not batch["loss_mask"][r, n:].any() and not batch["tokens"][r, n:].any()
            assert not batch["last_hidden"][r, n:].any() and not batch["target_lse"][r, n:].any()


def test_first_sequences_view(cache_f32):
    """`first(n)`: the smaller training sets of a learning curve (any prefix of the cache, across shards)."""
    cache = TargetCache.open(cache_f32)
    view = cache.first(3)
    assert len(view) == 3 and len(cache) == 5
    assert view.num_tokens == sum(LENGTHS[:3])
    assert view.num_loss_tokens == sum(int(cache.sample(i)["loss_mask"].sum()) for i in range(3))
    assert cache.first(len(cache)).num_loss_tokens == cache.num_loss_tokens
    seen = sorted(int(i) for b in view.batches(2, 20, seed=1) for i in b["indices"] if i >= 0)
    assert seen == [0, 1, 2]
    with pytest.raises(IndexError):
        view.sample(3)
    for bad in (0, 6):
        with pytest.raises(ValueError, match="first"):
            cache.first(bad)


def test_sequences_from_responses(tmp_path):
    path = tmp_path / "responses.jsonl"
    recs = [{"index": 2, "prompt_ids": [2, 7, 8], "response_ids": list(range(10, 30)), "stopped": True},
            {"index": 0, "prompt_ids": [2, 5], "response_ids": [11, 12, 13], "stopped": False},
            {"index": 1, "prompt_ids": [2, 6], "response_ids": list(range(40, 56)), "stopped": False},
            {"index": 2, "prompt_ids": [9], "response_ids": [9], "stopped": True}]  # duplicate: first wins
    path.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"index": 3, "prompt_i')  # torn last line
    seqs = sequences.sequences_from_responses(path, min_loss_tokens=14)
    assert [len(s) for s in seqs] == [18, 23]  # index 0 dropped (3 response tokens), then 1 and 2 in order
    np.testing.assert_array_equal(seqs[0].tokens, [2, 6] + list(range(40, 56)))
    np.testing.assert_array_equal(seqs[0].loss_mask, [0, 0] + [1] * 16)
    assert seqs[1].loss_mask.dtype == np.uint8 and seqs[1].tokens.dtype == np.int32
    assert len(sequences.sequences_from_responses(path, min_loss_tokens=0)) == 3
    cut = sequences.sequences_from_responses(path, min_loss_tokens=14, max_length=17)  # 15 and 14 response tokens left
    assert [len(s) for s in cut] == [17, 17] and [s.num_loss_tokens for s in cut] == [15, 14]
    assert sequences.sequences_from_responses(path, min_loss_tokens=15, max_length=17)[0].num_loss_tokens == 15
    assert sequences.plan_shards([5, 5, 5, 20, 1], 10) == [(0, 2), (2, 3), (3, 4), (4, 5)]


def test_size_estimate_and_sequence_cache(target, tmp_path):
    assert cache_format.estimate_cache_bytes(1000, 5, 640, "bfloat16") == 1000 * (6 * 640 * 2 + 9)
    assert cache_format.estimate_cache_bytes(10, 2, 8, "float32") == 10 * (3 * 8 * 4 + 9)
    assert "GiB" in cache_format.describe_cache_size(10**6, 5, 640)
    path = cache_builder.build_sequence_cache(target, make_sequences(), tmp_path / "seq", shard_max_tokens=50, progress=False)
    cache = TargetCache.open(path, target_config=target.config)
    assert not cache.has_features and not (path / "shard-00000" / "features.npy").exists()
    assert set(cache.sample(1)) == {"tokens", "loss_mask"}
    assert set(next(cache.batches(2, 8))) == {"indices", "lengths", "tokens", "loss_mask"}
    with pytest.raises(ValueError, match="holds no target features"):
        TargetCache.open(path, layer_ids=[0])


def test_prepare_pipeline(target, tmp_path):
    from dspark_jax.cli.prepare_data import parse_layer_ids, parse_mix, prepare
    from dspark_jax.training.responses import RegenConfig

    regen = RegenConfig(max_new_tokens=16, max_prompt_tokens=24, batch_size=2)
    prompts = ["What is 2+2?", "Name a colour.", "Write a haiku about rain."]
    stats = prepare(target, prompts, tmp_path, regen, layer_ids=(0, 2), min_loss_tokens=4, progress=False)
    assert stats["prompts"] == stats["responses"] == stats["sequences"] == 3
    assert stats["response_tokens"] == 48 and stats["total_tokens"] > 48
    assert json.loads((tmp_path / "data_stats.json").read_text()) == stats
    cache = TargetCache.open(tmp_path / "cache", target_config=target.config)
    assert cache.layer_ids == (0, 2) and len(cache) == 3 and cache.num_loss_tokens == 48
    # resuming is a no-op; other response settings are refused
    assert prepare(target, prompts, tmp_path, regen, layer_ids=(0, 2), min_loss_tokens=4, progress=False) == stats
    with pytest.raises(ValueError, match="regen differ"):
        prepare(target, prompts, tmp_path, RegenConfig(max_new_tokens=8, max_prompt_tokens=24), progress=False)
    # --noregenerate: every response of the file, whatever prompt list made it (its indices refer to that list)
    other = tmp_path / "other"
    other.mkdir()
    (other / "responses.jsonl").write_text((tmp_path / "responses.jsonl").read_text())
    kept = prepare(target, prompts[:1], other, RegenConfig(temperature=0.7), layer_ids=(0, 2), min_loss_tokens=4,
                   progress=False, regenerate_responses=False)
    assert kept["responses"] == kept["sequences"] == 3 and kept["prompts"] is None
    assert kept["response_tokens"] == 48 and not (other / "prepare_settings.json").exists()
    # several response files (one gzipped): several responses per prompt, read in order
    packed = tmp_path / "responses.jsonl.gz"
    packed.write_bytes(gzip.compress((tmp_path / "responses.jsonl").read_bytes()))
    two = tmp_path / "two"
    two.mkdir()
    both = prepare(target, prompts[:1], two, RegenConfig(), layer_ids=(0, 2), min_loss_tokens=4, progress=False,
                   regenerate_responses=False, response_files=[tmp_path / "responses.jsonl", packed])
    assert both["responses"] == both["sequences"] == 6 and both["response_tokens"] == 96
    assert TargetCache.open(two / "cache", target_config=target.config).num_loss_tokens == 96
    manifest = json.loads((two / "cache" / "manifest.json").read_text())
    assert manifest["settings"]["responses"] == [str((tmp_path / "responses.jsonl").resolve()), str(packed.resolve())]
    with pytest.raises(ValueError, match=r"none with >= 4 tokens \(3 of them cut by --max_length 5\)"):
        prepare(target, prompts, tmp_path / "cut", regen, progress=False, regenerate_responses=False,
                response_files=[packed], max_length=5, min_loss_tokens=4)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        prepare(target, prompts, two, regen, progress=False, regenerate_responses=False,
                response_files=[packed, tmp_path / "missing.jsonl"])
    with pytest.raises(ValueError, match="only with --noregenerate"):
        prepare(target, prompts, two, regen, progress=False, response_files=[packed])
    bad_files = {"plain.jsonl.gz": b"not gzip", "cut.jsonl.gz": packed.read_bytes()[:60],  # truncated gzip
                 "corrupt.jsonl.gz": packed.read_bytes()[:10] + b"garbage" * 20}
    for name, data in bad_files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: not a gzipped UTF-8 JSONL file"):
            prepare(target, prompts, two, regen, progress=False, regenerate_responses=False,
                    response_files=[tmp_path / name])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "prose.jsonl").write_text("not json\nat all\n")
    for name, message in (("empty.jsonl", r"no responses in it \(empty\)"),
                          ("prose.jsonl", r"no responses in it \(2 line\(s\) that are not valid JSON\)")):
        with pytest.raises(ValueError, match=f"{name}: {message}"):
            prepare(target, prompts, two, regen, progress=False, regenerate_responses=False,
                    response_files=[packed, tmp_path / name])
    for files, message in (([packed, str(packed)], "given twice"), ([packed, " "], "an empty entry"),
                           ([tmp_path], "is a directory")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            prepare(target, prompts, two, regen, progress=False, regenerate_responses=False, response_files=files)
    assert parse_mix("gsm8k=5, livecodebench=2") == {"gsm8k": 5, "livecodebench": 2}
    assert parse_layer_ids("-1,3,7") == (-1, 3, 7)
    for bad in ("gsm8k", "gsm8k=0", "gsm8k=x", "a=1,a=2"):
        with pytest.raises(ValueError, match="--mix"):
            parse_mix(bad)


def test_heldout_prompts_are_the_first_of_each_evaluation_set():
    from dspark_jax.cli.prepare_data import HELDOUT_SETS, heldout_prompts
    from dspark_jax.data import eval_dataset_path, read_first_turns
    prompts = heldout_prompts(2)
    assert prompts == [p for name in HELDOUT_SETS for p in read_first_turns(eval_dataset_path(name))[:2]]
    with pytest.raises(ValueError, match="at most 200"):
        heldout_prompts(201)


def test_cli_help_and_errors(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dspark_jax.cli.main", "prepare-data", *args],
                              capture_output=True, text=True, timeout=120)

    r = cli("--help")
    assert r.returncode == 0
    for flag in ("--target", "--output_dir", "--mix", "--prompts_file", "--seed", "--max_new_tokens",
                 "--max_prompt_tokens", "--temperature", "--top_k", "--top_p", "--batch_size", "--layer_ids",
                 "--cache_dtype", "--min_loss_tokens", "--online", "--heldout"):
        assert flag in r.stdout, flag
    r = cli("--output_dir", str(tmp_path), "--cache_dtype", "float16")
    assert r.returncode == 2 and "float16" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("--output_dir", str(tmp_path), "--heldout", "4", "--mix", "gsm8k=3")
    assert r.returncode == 2 and "--heldout" in r.stderr and "Traceback" not in r.stderr

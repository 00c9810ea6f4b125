"""`dspark eval` / `dspark calibrate`: the evaluation on tiny models (runner = generate_text, report files,
offline sweep = a real thresholded round), one-line errors for bad input, and end-to-end runs on the real
model (slow)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from dspark_jax.testing.tiny_configs import tiny_gemma3
from dspark_jax.drafters.factory import random_drafter
from dspark_jax.evaluation.acceptance import accept_length
from dspark_jax.evaluation.datasets import Benchmark, eval_tail_prompts, heldout_prompts, load_benchmark
from dspark_jax.evaluation.runner import decode_speculative
from dspark_jax.evaluation.sweep import cut_lengths
from dspark_jax.generation import GenerationConfig, generate_text
from dspark_jax.models.transformer import Transformer
from dspark_jax.target import Target

GEN = GenerationConfig(max_new_tokens=12, temperature=1.0, batch_size=3, seed=3)
PROMPTS = ("hello there", "what is 2+2", "x")


class CharTokenizer:
    """Enough of a tokenizer for the tiny target: one id per character."""
    vocab_size, bos_id, eos_id, pad_id, stop_ids, add_bos = 97, 1, 2, 0, (2,), True

    def encode(self, text, add_bos=True):
        return ([1] if add_bos else []) + [5 + ord(c) % 90 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i % 90) for i in ids)


@pytest.fixture(scope="module")
def tiny():
    cfg = dataclasses.replace(tiny_gemma3(), bos_token_id=1, eos_token_ids=(2,))
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    target = Target(cfg, graphdef, state, CharTokenizer(), "tiny")
    return target, random_drafter(target, "dspark", gamma=4, num_layers=1)


def test_runner_matches_generate_text_and_keeps_every_round(tiny):
    target, drafter = tiny
    run = decode_speculative(target, drafter, PROMPTS, GEN)
    ref = generate_text(target, PROMPTS, GEN, drafter=drafter)
    assert [list(t) for t in run.token_ids] == [r.completion_ids for r in ref]
    rec = run.records
    for i, r in enumerate(ref):
        mine = rec.request == i
        assert mine.sum() == r.rounds and rec.committed[mine].sum() + 1 == r.new_tokens
        assert rec.proposed[mine].sum() == r.proposed
        assert rec.model_forward[mine].sum() == r.model_rounds == r.rounds  # a model drafter: every round
    assert accept_length(rec) == pytest.approx(rec.committed.sum() / sum(r.rounds for r in ref))
    np.testing.assert_array_equal(rec.accept_flags.sum(1), rec.accepted)


def test_offline_sweep_matches_a_real_thresholded_first_round(tiny):
    """Round 1 sees the same context and draws in both runs, so the threshold-0 record predicts it exactly."""
    target, drafter = tiny
    full = decode_speculative(target, drafter, PROMPTS, GEN, confidence_threshold=0.0).records
    t = float(np.median(full.confidence[full.request == 0][0]))  # cuts somewhere inside the first block
    cut = decode_speculative(target, drafter, PROMPTS, GEN, confidence_threshold=t).records
    for i in range(len(PROMPTS)):
        f, c = np.flatnonzero(full.request == i)[0], np.flatnonzero(cut.request == i)[0]
        n_t = cut_lengths(full.confidence[f:f + 1], t)[0]
        assert cut.proposed[c] == n_t
        assert cut.accepted[c] == min(full.accepted[f], n_t)


def test_evaluation_writes_report_json_markdown_and_plots(tiny, tmp_path):
    from dspark_jax.evaluation.report import write_report
    from dspark_jax.evaluation.suite import EvalConfig, evaluate
    target, dspark = tiny
    dflash = random_drafter(target, "dflash", gamma=4, num_layers=1)
    sets = [Benchmark("a", "math", PROMPTS, "mem"), Benchmark("b", "chat", ("chat with me", "hi", "ok"), "mem")]
    logs = []
    result = evaluate(target, sets, [("DSpark", dspark), ("DFlash", dflash)], EvalConfig(GEN), log=logs.append)
    assert any("plain" in m for m in logs) and any("DFlash" in m for m in logs)
    paths = write_report(result, tmp_path, machine="test")
    assert paths["json"] == tmp_path / "eval.json"
    for name in ("eval.json", "eval.md", "records.npz", "position_acceptance.png", "reliability_DSpark.png",
                 "threshold_sweep_DSpark.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not (tmp_path / "reliability_DFlash.png").exists()  # no confidence head, no reliability
    data = json.loads((tmp_path / "eval.json").read_text())
    rows = {(r["drafter"], r["dataset"]): r for r in data["results"]}
    for (label, dataset), row in rows.items():
        rec = result.run(label, dataset).records
        assert row["accept_length"] == pytest.approx(rec.committed.sum() / len(rec))  # pooled
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / data["plain"][dataset]["tokens_per_s"])
    macro = data["macro_average"]["DSpark"]
    assert macro["all"]["accept_length"] == pytest.approx(
        (rows["DSpark", "a"]["accept_length"] + rows["DSpark", "b"]["accept_length"]) / 2)
    assert set(macro) == {"all", "math", "chat"}
    assert len(data["confidence_reliability"]["DSpark"]["positions"]) == 4
    assert "DFlash" not in data["threshold_sweep"]
    md = (tmp_path / "eval.md").read_text()
    assert "| drafter | math: a | chat: b | math | chat | macro |" in md and "ECE" in md


def test_evaluation_reports_lookup_and_hybrid_drafters_with_calibration(tiny, tmp_path):
    """`dspark eval` takes ngram and <drafter>+ngram specs; their confidences get reliability / ECE rows."""
    from dspark_jax.cli.eval import parse_drafter_specs
    from dspark_jax.drafters.factory import hybrid_drafter, load_drafter
    from dspark_jax.evaluation.report import write_report
    from dspark_jax.evaluation.suite import EvalConfig, evaluate
    assert parse_drafter_specs("ngram:n_max=4:n_min=2,default+ngram,H=default+ngram:n_max=2") == [
        ("ngram:n_max=4:n_min=2", "ngram:n_max=4:n_min=2"), ("default+ngram", "default+ngram"),
        ("H", "default+ngram:n_max=2")]
    assert parse_drafter_specs("greedy+sampled=default") == [("greedy+sampled", "default")]  # a label may hold '+'
    target, dspark = tiny
    drafters = [("lookup", load_drafter("ngram", target, gamma=4)), ("hybrid", hybrid_drafter(dspark, target))]
    loops = ("abcabcabcabc", "xyxyxyxy", "hello hello hello")
    result = evaluate(target, [Benchmark("a", "code", loops, "mem")], drafters, EvalConfig(GEN))
    write_report(result, tmp_path, machine="test")
    data = json.loads((tmp_path / "eval.json").read_text())
    assert set(data["confidence_reliability"]) == {"lookup", "hybrid"}
    assert {r["drafter"] for r in data["results"]} == {"lookup", "hybrid"}
    rows = {r["drafter"]: r for r in data["results"]}
    assert rows["lookup"]["model_rounds"] == 0  # lookup never runs a model
    hybrid = result.run("hybrid", "a").records
    assert rows["hybrid"]["model_rounds"] == hybrid.model_forward.sum() > 0
    saved = np.load(tmp_path / "records.npz")
    np.testing.assert_array_equal(saved["1/a/model_forward"], hybrid.model_forward)
    np.testing.assert_array_equal(saved["1/a/lookup_draft"], hybrid.lookup_draft)
    assert "rounds running the drafter model" in (tmp_path / "eval.md").read_text()


def test_records_say_which_drafter_each_round_verified(tiny):
    """RoundRecords.lookup_draft / lookup_expected (T = 0, where the tiny target's greedy output repeats itself)."""
    from dspark_jax.drafters.factory import hybrid_drafter, load_drafter
    from dspark_jax.evaluation.suite import EvalConfig, evaluate
    target, dspark = tiny
    drafters = [("lookup", load_drafter("ngram", target, gamma=4)), ("hybrid", hybrid_drafter(dspark, target))]
    loops = ("abcabcabcabc", "xyxyxyxy", "hello hello hello")
    greedy = dataclasses.replace(GEN, temperature=0.0, max_new_tokens=24)
    result = evaluate(target, [Benchmark("a", "code", loops, "mem")], drafters, EvalConfig(greedy))
    survival = lambda r: np.cumprod(r.confidence, axis=1).sum(1)  # noqa: E731  (a lookup's c is 0 past its match)
    lookup = result.run("lookup", "a").records
    assert lookup.lookup_draft.all() and (lookup.lookup_expected > 0).any()
    assert not lookup.model_forward.any()  # no model: no round ran a model's forward
    np.testing.assert_allclose(lookup.lookup_expected, survival(lookup), rtol=1e-5, atol=1e-6)
    # the hybrid: a round that skipped its model verified the lookup's draft; a lookup row's confidence is the
    # lookup's, so its recorded expected length is that row's survival sum; a model row's is not
    hybrid = result.run("hybrid", "a").records
    assert hybrid.lookup_draft[~hybrid.model_forward].all()
    assert 0 < hybrid.lookup_draft.sum() < len(hybrid)
    mine = hybrid.lookup_draft
    np.testing.assert_allclose(hybrid.lookup_expected[mine], survival(hybrid)[mine], rtol=1e-5, atol=1e-6)
    assert (hybrid.lookup_expected >= 0).all()
    # the model drafter alone: no lookup anywhere
    alone = evaluate(target, [Benchmark("a", "code", loops[:1], "mem")], [("m", dspark)], EvalConfig(greedy))
    rec = alone.run("m", "a").records
    assert not rec.lookup_draft.any() and not rec.lookup_expected.any()


def test_benchmark_names_and_heldout_split():
    gsm = load_benchmark("gsm8k")
    assert len(gsm.prompts) == 200 and gsm.domain == "math" and gsm.prompts[0].startswith("Question: ")
    assert load_benchmark("mt-bench", limit=3).prompts == load_benchmark("mt-bench").prompts[:3]
    # --offset: a later slice, disjoint from the first --limit prompts; past the end: the whole tail
    assert load_benchmark("mt-bench", limit=3, offset=2).prompts == load_benchmark("mt-bench").prompts[2:5]
    assert load_benchmark("mt-bench", limit=48, offset=48).prompts == load_benchmark("mt-bench").prompts[48:80]
    assert load_benchmark("gsm8k", offset=190).prompts == gsm.prompts[190:]  # still gsm8k's first 200 only
    with pytest.raises(ValueError, match="mt-bench has 80 prompts: none from offset 80 on"):
        load_benchmark("mt-bench", offset=80)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        load_benchmark("mt-bench", offset=-1)
    with pytest.raises(ValueError, match="training prompts"):
        load_benchmark("livecodebench")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_benchmark("gsm9k")
    evaluation = {p for name in ("gsm8k", "math500", "aime25", "humaneval", "mbpp", "mt-bench")
                  for p in load_benchmark(name).prompts}
    from dspark_jax.data import select_training_prompts
    from dspark_jax.training.responses import format_prompt
    trained = {format_prompt(p) for p in select_training_prompts()}
    held = heldout_prompts(30, seed=1)
    assert len(set(held)) == 30 and not (set(held) & evaluation) and not (set(held) & trained)


def test_eval_tail_prompts_are_the_last_of_each_set_and_never_in_a_limited_eval():
    tails = eval_tail_prompts(32)
    sets = [load_benchmark(name).prompts for name in ("humaneval", "mbpp", "mt-bench")]
    assert tails[:3] == [s[-32] for s in sets] and tails[-3:] == [s[-1] for s in sets] and len(set(tails)) == 96
    assert not set(tails) & {p for name in ("humaneval", "mbpp", "mt-bench") for p in load_benchmark(name, 48).prompts}
    short = eval_tail_prompts(2, ("mbpp",), keep=lambda p: len(p) < 300)  # the last two that pass the filter
    assert short == [p for p in sets[1] if len(p) < 300][-2:]
    assert eval_tail_prompts(1, ("mt-bench",), raw=True)[0] == load_benchmark("mt-bench", raw=True).prompts[-1]
    with pytest.raises(ValueError, match="only 80 prompts"):
        eval_tail_prompts(81, ("mt-bench",))


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dspark_jax.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_the_flags():
    r = run_cli("eval", "--help")
    assert r.returncode == 0
    for flag in ("--datasets", "--drafters", "--limit", "--temperature", "--max_new_tokens", "--gamma",
                 "--confidence_threshold", "--output_dir", "--seed", "--batch_size"):
        assert flag in r.stdout, flag
    r = run_cli("calibrate", "--help")
    assert r.returncode == 0 and "--in_place" in r.stdout and "held-out" in r.stdout and "--[no]bias" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["eval", "--datasets", "gsm8k,nope"], "unknown dataset 'nope'"),
    (["eval", "--datasets", "arena-hard-v2"], "training prompts"),
    (["eval", "--datasets", "/nonexistent/x.jsonl"], "prompts file not found"),
    (["eval", "--drafters", "default,/nonexistent/drafter"], "drafter not found"),
    (["eval", "--confidence_threshold", "1.5"], "confidence_threshold"),
    (["calibrate", "--output", "/tmp/x", "--in_place"], "exactly one of --output"),
    (["calibrate", "--in_place"], "would overwrite the shipped drafter"),
    (["calibrate", "--output", "/tmp/x", "--eval_tails", "4", "--prompts_file", "/tmp/p.jsonl"], "--eval_tails"),
    (["calibrate", "--output", "/tmp/x", "--hybrid", "--temperature", "1"], "--hybrid fits the greedy"),
    (["calibrate", "--output", "/tmp/x", "--rounds", "/tmp/r.npz"], "it needs --hybrid"),
    (["calibrate", "--output", "/tmp/x", "--hybrid", "--temperature", "0", "--rounds", "/nonexistent/r.npz"],
     "no such file"),
    (["eval", "--datasets", "mt-bench", "--offset", "80"], "mt-bench has 80 prompts: none from offset 80 on"),
])
def test_bad_input_gives_one_line_error(args, message):
    r = run_cli(*args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_eval_and_calibrate_end_to_end_on_default_target(tmp_path):
    out = tmp_path / "eval"
    r = run_cli("eval", "--datasets", "mt-bench", "--limit", "1", "--max_new_tokens", "8", "--drafters",
                "default,random:dflash", "--output_dir", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "eval.json").read_text())
    assert {row["drafter"] for row in data["results"]} == {"default", "random:dflash"}
    assert all(row["identical_to_plain"] for row in data["results"])
    assert (out / "reliability_default.png").exists()
    r = run_cli("calibrate", "--num_prompts", "2", "--max_new_tokens", "16", "--min_class_count", "0",
                "--output", str(tmp_path / "calibrated"), "--report_dir", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "calibrated" / "drafter.json").read_text())
    assert meta["drafter_config"]["block_size"] == 15  # the shipped drafter's 15-token block (session 30)
    assert len(meta["calibration"]["temperatures"]) == 15  # one temperature per draft position
    # the shipped drafter's set (fitted at T = 0) is kept next to this run's (T = 1, the flag's default)
    assert [c["sampling_temperature"] for c in meta["calibrations"]] == [0.0, 1.0]
    assert "calibration sets: T=0, T=1" in r.stderr
    assert (tmp_path / "report" / "reliability_before_after.png").exists()
    # --hybrid: the row calibration of <drafter>+ngram, fitted on prompts whose greedy outputs repeat themselves
    prompts = tmp_path / "loops.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"Write the word {w} twenty times, separated by spaces."]}) + "\n"
                               for w in ("apple", "river", "stone", "cloud")))
    r = run_cli("calibrate", "--hybrid", "--temperature", "0", "--prompts_file", str(prompts), "--num_prompts", "4",
                "--max_new_tokens", "48", "--batch_size", "4", "--drafter", str(tmp_path / "calibrated"),
                "--output", str(tmp_path / "hybrid"), "--report_dir", str(tmp_path / "hybrid_report"))
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "hybrid" / "drafter.json").read_text())
    record = meta["hybrid_calibration"]
    assert len(record["weights"]) == len(record["features"]) == 14 and record["rounds"] > 0
    assert 0 < record["lookup_rows"] < record["rounds"]
    assert meta["calibrations"] == json.loads((tmp_path / "calibrated" / "drafter.json").read_text())["calibrations"]
    assert (tmp_path / "hybrid_report" / "hybrid_records.npz").exists()
    assert "survival ECE %" in r.stdout
    # --rounds: the same fit from the saved rounds, without decoding; how they were decoded is carried over
    r = run_cli("calibrate", "--hybrid", "--temperature", "0", "--rounds",
                str(tmp_path / "hybrid_report" / "hybrid_records.npz"), "--drafter", str(tmp_path / "calibrated"),
                "--output", str(tmp_path / "refit"), "--report_dir", str(tmp_path / "refit_report"))
    assert r.returncode == 0, r.stderr
    refit = json.loads((tmp_path / "refit" / "drafter.json").read_text())["hybrid_calibration"]
    assert refit["weights"] == pytest.approx(record["weights"]) and refit["rounds"] == record["rounds"]
    assert refit["num_prompts"] == 4 and refit["rounds_file"].endswith("hybrid_records.npz")
    np.savez(tmp_path / "bad.npz", request=np.zeros(3))
    r = run_cli("calibrate", "--hybrid", "--temperature", "0", "--rounds", str(tmp_path / "bad.npz"),
                "--drafter", str(tmp_path / "calibrated"), "--output", str(tmp_path / "refit2"))
    assert r.returncode != 0 and "not a --hybrid run's hybrid_records.npz" in r.stderr, r.stderr
    assert not (tmp_path / "refit2").exists()

"""`dspark` CLI: help texts and one-line errors for bad input (no traceback, non-zero exit)."""
from __future__ import annotations

import json
import re
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dspark_jax.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_top_level_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0 and "generate" in r.stdout


def test_generate_help_explains_every_flag():
    r = run_cli("generate", "--help")
    assert r.returncode == 0
    for flag in ("--prompt", "--prompts_file", "--target", "--max_new_tokens", "--temperature", "--top_k",
                 "--top_p", "--seed", "--output_json", "--batch_size"):
        assert flag in r.stdout, flag


def test_unknown_command():
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top_p", "1.5"], "top_p"),
    (["--prompt", "hi", "--max_new_tokens", "0"], "max_new_tokens"),
    (["--prompt", "hi", "--dtype", "int4"], "dtype"),
    (["--prompt", "hi", "--bogus_flag", "1"], "bogus_flag"),
    ([], "at least one --prompt"),
    (["--prompts_file", "/nonexistent.jsonl"], "prompts file not found"),
    (["--prompt", "hi", "--target", "/nonexistent/model.gguf"], "target not found"),
])
def test_bad_input_gives_one_line_error(args, message):
    r = run_cli("generate", *args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_prompts_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"turns": ["ok"]}\nnot json\n')
    r = run_cli("generate", "--prompts_file", str(f))
    assert r.returncode == 2 and "p.jsonl:2: invalid JSON" in r.stderr and "Traceback" not in r.stderr


def test_corrupted_gguf_target(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(6))
    r = run_cli("generate", "--prompt", "hi", "--target", str(f))
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr


REPEAT_PROMPT = "Question: Repeat after me: red green blue red green blue red green blue\n\nAnswer:"
PLAIN_PROMPTS = ("The capital of France is", "1, 2, 3, 4,", REPEAT_PROMPT)
NEW_TOKENS = 24


def generate_json(tmp_path, name, *args):
    """`dspark generate ... --output_json` at batch 1 → (process, rows by prompt or None on failure)."""
    out = tmp_path / f"{name}.json"
    r = run_cli("generate", "--max_new_tokens", str(NEW_TOKENS), "--batch_size", "1", "--output_json", str(out), *args)
    return r, ({d["prompt"]: d for d in json.loads(out.read_text())} if r.returncode == 0 else None)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """One plain `dspark generate` of every prompt on the default target: the speculative runs must equal it."""
    args = [a for p in PLAIN_PROMPTS for a in ("--prompt", p)]
    return generate_json(tmp_path_factory.mktemp("plain"), "plain", *args)


@pytest.mark.slow
def test_generate_end_to_end_on_default_target(plain_run):
    r, rows = plain_run
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout and "pooled accept length" not in r.stdout
    # batch 1: each prompt's line gives its own rate (a batch of several would give the batch's wall time)
    assert len(re.findall(r"^--- \d+ tokens, [\d.]+ tokens/s$", r.stdout, re.M)) == len(PLAIN_PROMPTS)
    assert list(rows) == list(PLAIN_PROMPTS)
    for d in rows.values():
        assert set(d) == {"prompt", "completion_ids", "completion_text", "new_tokens", "seconds", "tokens_per_s"}
        assert 1 <= d["new_tokens"] == len(d["completion_ids"]) <= NEW_TOKENS


@pytest.mark.parametrize("args,message", [
    (["--prompt", "hi", "--prompt", "   "], "prompt 1 is empty"),
    (["--prompt", "hi", "--confidence_threshold", "1.5"], "confidence_threshold"),
    (["--prompt", "hi", "--gamma", "4", "--draft_length", "auto"],
     "--gamma, --draft_length auto need a drafter: --drafter none decodes plainly"),
    (["--prompt", "hi", "--output_json", "."], "--output_json . is a directory"),
    (["--prompt", "hi", "--output_json", f"{__file__}/sub/out.json"], "test_cli.py is a file, not a folder"),
    (["--prompt", "hi", "--max_new_tokens", "0"], "flag --max_new_tokens=0: 0 is not a positive integer"),
    (["--prompt", "hi", "--no_such_flag"], "Unknown command line flag 'no_such_flag'"),
])
def test_bad_generate_input_fails_before_loading_the_target(args, message):
    r = run_cli("generate", *args, "--target", "/nonexistent/model.gguf")  # loading it would fail differently
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_serve_on_a_busy_port_fails_before_loading():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.perf_counter()
        r = run_cli("serve", "--port", str(port), "--target", "/nonexistent/model.gguf")  # loading would fail otherwise
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow
def test_overlong_prompt_on_default_target(tmp_path):
    long_file = tmp_path / "long.jsonl"
    long_file.write_text(json.dumps({"turns": ["word " * 40000]}) + "\n")
    r = run_cli("generate", "--prompts_file", str(long_file), "--max_new_tokens", "4")
    assert r.returncode == 2 and "exceeds the model's context" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_generate_with_random_drafter_reports_speculative_stats(tmp_path, plain_run):
    prompt = PLAIN_PROMPTS[0]
    r, rows = generate_json(tmp_path, "random", "--prompt", prompt, "--drafter", "random", "--draft_algorithm",
                            "dspark", "--gamma", "3", "--draft_vocab_size", "2048")
    assert r.returncode == 0, r.stderr
    assert "pooled accept length" in r.stdout
    s = rows[prompt]
    assert s["completion_ids"] == plain_run[1][prompt]["completion_ids"]
    assert s["rounds"] >= 1 and s["proposed"] == 3 * s["rounds"] and s["mean_accept_len"] >= 1


@pytest.mark.slow
def test_generate_with_lookup_and_hybrid_drafters(tmp_path, plain_run):
    """--drafter ngram[:…] and default+ngram on the default target: output equals plain decoding."""
    expected = plain_run[1][REPEAT_PROMPT]["completion_ids"]
    for name, extra in (("ngram", ["--drafter", "ngram:n_max=4,n_min=2", "--gamma", "5"]),
                        ("hybrid", ["--drafter", "default+ngram", "--gamma", "4"])):
        r, rows = generate_json(tmp_path, name, "--prompt", REPEAT_PROMPT, *extra)
        assert r.returncode == 0, r.stderr
        out = rows[REPEAT_PROMPT]
        assert out["completion_ids"] == expected, name
        assert out["proposed"] > 0 and out["mean_accept_len"] >= 1, name
        # lookup never runs a model; the hybrid runs its model in some rounds and skips it where lookup's draft is
        # trusted (this prompt: 1 of 8 rounds)
        assert (out["model_rounds"] == 0) if name == "ngram" else (0 < out["model_rounds"] < out["rounds"]), name
        assert f"({out['model_rounds']} ran the drafter model)" in r.stdout, name


def test_bad_drafter_flags():
    r = run_cli("generate", "--prompt", "hi", "--drafter", "ngram:n_max=0")
    assert r.returncode == 2 and "n_min" in r.stderr and "Traceback" not in r.stderr
    assert "loading target" not in r.stderr  # refused before the model loads
    r = run_cli("generate", "--prompt", "hi", "--drafter", "ngram", "--gamma", "1000")
    assert r.returncode == 2 and "must be in [1, 64], got 1000" in r.stderr and "loading target" not in r.stderr
    r = run_cli("generate", "--prompt", "hi", "--drafter", "/nonexistent/drafter")
    assert r.returncode == 2 and "drafter not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "--prompt", "hi", "--draft_algorithm", "medusa")
    assert r.returncode != 0 and "draft_algorithm" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "--prompt", "hi", "--gamma", "0")
    assert r.returncode != 0 and "gamma" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_profile_writes_cost_table_with_draft_free_step(tmp_path):
    out = tmp_path / "cost.json"
    r = run_cli("profile", "--drafter", "ngram", "--slots", "2", "--steps", "1", "--passes", "2", "--max_len", "64",
                "--output", str(out))
    assert r.returncode == 0, r.stderr
    table = json.loads(out.read_text())
    assert table["buckets"] == [2, 4, 8, 16] and all(s > 0 for s in table["steps_per_s"])
    assert table["plain_steps_per_s"] > 0 and "no drafter" in r.stdout
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_serve_bench_end_to_end(tmp_path):
    r = run_cli("serve-bench", "--concurrency", "1", "--policies", "plain,scheduler", "--requests_per_client", "1",
                "--max_new_tokens", "4", "--max_len", "128", "--prompt_sets", "gsm8k", "--output_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "serve_bench.json").read_text())["results"]
    assert [x["policy"] for x in rows] == ["plain", "scheduler"]
    assert all(x["output_tokens"] == 4 and x["aggregate_tps"] > 0 for x in rows)
    assert "| 1 | scheduler |" in (tmp_path / "serve_bench.md").read_text()
    assert (tmp_path / "throughput_vs_per_user.png").exists() and (tmp_path / "verification_budget.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--policies", "fixedx"], "unknown policy"),
    (["--concurrency", "0"], "positive integers"),
    (["--concurrency", "a,b"], "comma-separated positive integers"),
])
def test_serve_bench_bad_flags(args, message):
    r = run_cli("serve-bench", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_serve_command_answers_openai_clients_and_exits_0_on_sigterm(tmp_path):
    """`dspark serve` end to end on the embedded target: a policy with API keys, a completion through the
    `openai` client, 401 without a key, SIGTERM → exit 0."""
    import signal

    import httpx
    import openai
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = tmp_path / "keys.txt"
    keys.write_text("test-key research\n")
    env = dict(os.environ)
    env.pop("DSPARK_API_KEYS", None)
    proc = subprocess.Popen([sys.executable, "-m", "dspark_jax.cli.main", "serve", "--drafter", "ngram",
                             "--engine_policy", "fixed", "--slots", "2", "--max_len", "128", "--port", str(port),
                             "--policy", "configs/policies/default.yaml", "--api_keys_file", str(keys)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "dspark serve did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0)
        out = client.completions.create(model="gemma3-270m", prompt="Question: What is 2 + 2?\n\nAnswer:",
                                        max_tokens=8, temperature=0)
        assert out.choices[0].text and out.usage.completion_tokens >= 1 and out.model == "gemma3-270m"
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=30).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

"""`dspark serve`: the OpenAI-compatible routes on a real uvicorn server (tiny target), called with the `openai`
client and raw HTTP — greedy output equal to plain decoding, streaming, chat template, stop strings, usage,
OpenAI-shaped errors naming the field, API keys → tenants, 401 / 403 / 429 + Retry-After, Prometheus metrics,
and a disconnecting client freeing its slot."""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from dspark_jax.sampling import FilterMode
from dspark_jax.drafters.factory import random_drafter
from dspark_jax.governance import Governor, policy_from_dict
from dspark_jax.governance.serving import GovernedEngine
from dspark_jax.server.app import create_app
from dspark_jax.server.auth import ApiKeys, bearer_token
from dspark_jax.server.backend import Backend
from dspark_jax.server.chat import NoChatTemplate, render_chat
from dspark_jax.server.text import TextStream
from dspark_jax.serving.engine import Engine, EngineConfig
from dspark_jax.serving.cost_table import CostTable
from dspark_jax.testing.tiny_target import CharTokenizer, make_tiny_target, plain_greedy

MAX_LEN = 64
START, END = 95, 96


class ChatCharTokenizer(CharTokenizer):
    """The character tokenizer plus Gemma's turn markers as single ids."""

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [2] if add_bos else []
        for k, part in enumerate(text.split("<start_of_turn>")):
            if k:
                ids.append(START)
            for j, piece in enumerate(part.split("<end_of_turn>")):
                if j:
                    ids.append(END)
                ids += super().encode(piece, add_bos=False)
        return ids


@pytest.fixture(scope="module")
def target():
    return dataclasses.replace(make_tiny_target(), tokenizer=ChatCharTokenizer())


@pytest.fixture(scope="module")
def drafter(target):
    return random_drafter(target, "dspark", gamma=3, num_layers=1)


@contextlib.contextmanager
def serving(target, drafter, keys=None, policy=None, max_len=MAX_LEN, buckets=None):
    engine = Engine(target, drafter, EngineConfig(slots=2, max_len=max_len, policy="fixed", buckets=buckets,
                                                  mode=FilterMode(max_top_k=8, top_p=True)),
                    cost_table=CostTable((2, 8), (10.0, 5.0)))
    governed = GovernedEngine(engine, Governor(policy_from_dict(policy))) if policy else None
    app = create_app(Backend(engine, governed), "tiny", keys)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert engine.idle  # nothing left in a slot


@pytest.fixture(scope="module")
def open_server(target, drafter):
    with serving(target, drafter) as s:
        yield s


def client(url, key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def greedy_text(target, ids, n):
    return target.tokenizer.decode([t for t in plain_greedy(target, ids, n, width=64) if t != 1])


def test_completion_equals_plain_greedy_and_reports_usage(target, open_server):
    url, _ = open_server
    out = client(url).completions.create(model="tiny", prompt="hello there", max_tokens=12, temperature=0)
    ids = target.tokenizer.encode("hello there")
    assert out.choices[0].text == greedy_text(target, ids, 12)
    usage = out.usage.model_dump()
    assert usage["prompt_tokens"] == len(ids) and 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["rounds"] >= 1 and usage["accepted_draft_tokens"] >= 0 and usage["accept_length"] >= 1
    assert out.choices[0].finish_reason in ("stop", "length")


def test_streaming_gives_the_same_text_and_usage(target, open_server):
    url, _ = open_server
    c = client(url)
    whole = c.completions.create(model="tiny", prompt="stream me", max_tokens=10, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="tiny", prompt="stream me", max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    with httpx.stream("POST", f"{url}/v1/completions", json=dict(prompt="stream me", max_tokens=3, stream=True,
                                                               temperature=0), timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_uses_the_turn_format(target, open_server):
    url, _ = open_server
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = render_chat(target.tokenizer, [(m["role"], m["content"]) for m in messages])
    enc = lambda s: target.tokenizer.encode(s, add_bos=False)  # noqa: E731
    assert ids == [2, START] + enc("user\nbe brief\n\nhi") + [END] + enc("\n") + [START] + enc("model\n")
    out = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == greedy_text(target, ids, 8)
    chunks = list(client(url).chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8,
                                                      temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == out.choices[0].message.content
    with pytest.raises(NoChatTemplate):
        render_chat(CharTokenizer(), [("user", "hi")])


def test_a_seed_gives_the_same_sample_alone_or_with_concurrent_requests(open_server):
    url, _ = open_server
    c = client(url)
    ask = lambda seed: c.completions.create(model="tiny", prompt="seeded", max_tokens=12, temperature=0.9,  # noqa: E731
                                            seed=seed).choices[0].text
    alone = ask(5)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        noise = [pool.submit(c.completions.create, model="tiny", prompt=f"other {i}", max_tokens=20, temperature=1.0)
                 for i in range(2)]
        crowded = pool.submit(ask, 5)
        assert crowded.result() == alone
        [f.result() for f in noise]


def test_stop_strings_end_the_text_before_them(target, open_server):
    """The text ends before the stop string, and usage counts the completion's tokens: up to the one that
    completed the stop string, not the ones the engine committed past it."""
    url, _ = open_server
    ids = target.tokenizer.encode("abc")
    tokens = plain_greedy(target, ids, 16, width=64)
    text_of = lambda toks: target.tokenizer.decode([t for t in toks if t != 1])  # noqa: E731 (as `greedy_text`)
    full = text_of(tokens)
    stop = full[5:7]
    expected = full[:full.find(stop)]
    until_stop = next(k for k in range(1, len(tokens) + 1) if stop in text_of(tokens[:k]))
    for stream in (False, True):
        out = client(url).completions.create(model="tiny", prompt="abc", max_tokens=16, temperature=0, stop=[stop],
                                             stream=stream, **({"stream_options": {"include_usage": True}}
                                                               if stream else {}))
        if stream:
            events = list(out)
            chunks = [ch for ch in events if ch.choices]
            text, reason = "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
            usage = events[-1].usage
        else:
            text, reason, usage = out.choices[0].text, out.choices[0].finish_reason, out.usage
        assert text == expected and reason == "stop"
        assert usage.completion_tokens == until_stop < 16
        assert usage.total_tokens == usage.prompt_tokens + until_stop


def test_a_model_this_server_does_not_serve_is_404(open_server):
    url, _ = open_server
    for call in (lambda c: c.completions.create(model="gpt-4", prompt="abc", max_tokens=4),
                 lambda c: c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4)):
        with pytest.raises(openai.NotFoundError) as e:
            call(client(url))
        assert e.value.code == "model_not_found" and "'tiny'" in e.value.message
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_text_stream_holds_back_partial_stop_strings():
    class Letters:
        def decode(self, ids):
            return "".join(chr(i) for i in ids)
    s = TextStream(Letters(), stop=["xyz"])
    assert [s.push(ord(c)) for c in "abx"] == ["a", "b", ""]  # "x" may start the stop string
    assert s.push(ord("y")) == "" and s.push(ord("q")) == "xyq"
    assert s.push(ord("x")) + s.push(ord("y")) + s.push(ord("z")) == "" and s.stopped and s.finish() == ""
    t = TextStream(Letters(), stop=[])
    assert t.push(ord("a")) == "a" and t.push(0xFFFD) == "" and t.finish() == "\ufffd"


def _error(response, status, param=None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    return err


def test_bad_requests_get_openai_errors_naming_the_field(target, open_server):
    url, _ = open_server
    post = lambda body, path="/v1/completions": httpx.post(f"{url}{path}", timeout=30, **body)  # noqa: E731
    assert _error(post(dict(content=b"{not json", headers={"content-type": "application/json"})), 400)["type"] \
        == "invalid_request_error"
    _error(post(dict(json={"prompt": "x", "max_tokens": "many"})), 400, "max_tokens")
    _error(post(dict(json={"prompt": "x", "max_tokens": -3})), 400, "max_tokens")
    _error(post(dict(json={"prompt": "x", "max_tokens": 10_000})), 400, "max_tokens")
    _error(post(dict(json={"prompt": "   "})), 400, "prompt")
    _error(post(dict(json={"prompt": "y" * 200})), 400, "prompt")
    _error(post(dict(json={"prompt": "x", "n": 2})), 400, "n")
    _error(post(dict(json={"prompt": "x", "temperature": -1})), 400, "temperature")
    _error(post(dict(json={"prompt": "x", "logprobs": 3})), 400)
    _error(post(dict(json={"prompt": "x", "best_frobnicate": 1})), 400, "best_frobnicate")
    _error(post(dict(json={"messages": []}), "/v1/chat/completions"), 400, "messages")
    _error(post(dict(json={"messages": [{"role": "robot", "content": "x"}]}), "/v1/chat/completions"), 400,
           "messages.0.role")
    _error(post(dict(json={"prompt": "x", "max_tokens": 2, "seed": "one"})), 400, "seed")
    _error(httpx.get(f"{url}/v1/nothing", timeout=30), 404)
    # the engine is still fine
    assert client(url).completions.create(model="tiny", prompt="ok", max_tokens=2, temperature=0).choices


def test_health_models_and_metrics(open_server):
    url, _ = open_server
    assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}
    assert [m.id for m in client(url).models.list()] == ["tiny"]
    client(url).completions.create(model="tiny", prompt="count me", max_tokens=3, temperature=0)
    text = httpx.get(f"{url}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # prometheus_client's own parser
    ok = [x for x in families["dspark_http_requests"].samples
          if x.labels == {"route": "/v1/completions", "status": "200"}]
    assert ok and ok[0].value >= 1
    assert any(x.labels == {"kind": "completion"} and x.value >= 3 for x in families["dspark_http_tokens"].samples)
    assert families["dspark_http_first_token_seconds"].type == "histogram"
    assert httpx.get(f"{url}/snapshot.json", timeout=30).status_code == 404  # no policy in force


def test_load_32_streaming_clients_lose_nothing(target, open_server):
    """32 concurrent streaming clients × 3 requests (loopback, bounded): every stream is well formed and complete
    and equals offline greedy decoding."""
    url, engine = open_server
    prompts = [f"client {i} request {j}" for i in range(32) for j in range(3)]
    expected = {p: greedy_text(target, target.tokenizer.encode(p), 6) for p in set(prompts)}

    def one_client(i):
        got = []
        with httpx.Client(timeout=120) as http:
            for j in range(3):
                p = f"client {i} request {j}"
                with http.stream("POST", f"{url}/v1/completions",
                                 json=dict(prompt=p, max_tokens=6, temperature=0, stream=True)) as r:
                    assert r.status_code == 200
                    lines = [line for line in r.iter_lines() if line]
                assert lines[-1] == "data: [DONE]"
                events = [json.loads(line[6:]) for line in lines[:-1]]
                assert all(e["object"] == "text_completion" for e in events)
                assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
                got.append((p, "".join(e["choices"][0]["text"] for e in events)))
        return got

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = [x for f in [pool.submit(one_client, i) for i in range(32)] for x in f.result()]
    assert len(results) == 96
    for p, text in results:
        assert text == expected[p], p
    deadline = time.time() + 30
    while not engine.idle:
        assert time.time() < deadline
        time.sleep(0.05)


def test_a_disconnecting_client_frees_its_slot(target, open_server):
    url, engine = open_server
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                      json=dict(prompt="long", max_tokens=40, stream=True, temperature=0)) as r:
        next(iter(r.iter_lines()))
    deadline = time.time() + 30
    while not engine.idle:
        assert time.time() < deadline, "the slot of a disconnected client was not freed"
        time.sleep(0.05)
    rid = max(engine._requests)
    assert engine.stats(rid).finish_reason in ("cancelled", "length", "stop")


POLICY = {"gamma": 3, "cost_per_hour_usd": 10.0,
          "classes": {"code": {}, "chat": {}},
          "tenants": {"acme": {"classes": "*", "quotas": [{"tokens": 60, "window_s": 3600}]},
                      "beta": {"classes": ["chat"]}}}


def test_keys_tenants_quotas_and_governance_metrics(target, drafter, monkeypatch):
    monkeypatch.setenv("DSPARK_API_KEYS", "key-a=acme,key-b=beta")
    keys = ApiKeys.load()
    with serving(target, drafter, keys, POLICY) as (url, _):
        body = dict(prompt="hi", max_tokens=4, temperature=0)
        _error(httpx.post(f"{url}/v1/completions", json=body, timeout=30), 401)
        _error(httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"},
                          timeout=30), 401)
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        beta = {"Authorization": "Bearer key-b"}
        _error(httpx.post(f"{url}/v1/completions", json=dict(body, workload_class="code"), headers=beta, timeout=30),
               403, "workload_class")
        ok = httpx.post(f"{url}/v1/completions", json=body, headers={**beta, "X-Workload-Class": "chat"}, timeout=30)
        assert ok.status_code == 200
        acme = client(url, "key-a")
        acme.completions.create(model="tiny", prompt="hi", max_tokens=20, temperature=0, extra_body={
            "workload_class": "code"})
        r = httpx.post(f"{url}/v1/completions", json=dict(body, max_tokens=50, workload_class="code"),
                       headers={"Authorization": "Bearer key-a"}, timeout=30)
        err = _error(r, 429)
        assert err["code"] == "quota_exceeded" and int(r.headers["Retry-After"]) >= 1
        text = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'dspark_requests_rejected_total{class="code",code="quota_exceeded",tenant="acme"}' in text
        snap = httpx.get(f"{url}/snapshot.json", timeout=30).json()
        assert snap["quotas"]["acme"][0]["used"] > 0


def test_api_key_sources(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# comment\nk1 acme\n\nk2 beta  # trailing\n")
    keys = ApiKeys.load(f, environ={"DSPARK_API_KEYS": "k3=gamma"})
    assert keys.tenant("k1") == "acme" and keys.tenant("k2") == "beta" and keys.tenant("k3") == "gamma"
    assert keys.tenant("k4") is None and keys.tenant(None) is None and keys.tenant("") is None
    f.write_text("only-a-key\n")
    with pytest.raises(ValueError, match=r"keys\.txt:1") as info:
        ApiKeys.load(f, environ={})
    assert "only-a-key" not in str(info.value)  # keys never appear in errors
    with pytest.raises(ValueError, match="DSPARK_API_KEYS"):
        ApiKeys.load(None, environ={"DSPARK_API_KEYS": "secret"})
    with pytest.raises(FileNotFoundError):
        ApiKeys.load(tmp_path / "missing.txt", environ={})
    assert bearer_token("Bearer abc") == "abc" and bearer_token("Basic abc") is None and bearer_token(None) is None


def test_a_request_with_broken_logits_ends_with_an_error(drafter):
    """A poisoned request (non-finite target logits) gets a 500 / a stream ending in finish_reason "error" and an
    error event; a neighbour is exact; the server keeps serving."""
    from tests.serving.test_fault_isolation import _case, poisoned
    from dspark_jax.testing.tiny_configs import tiny_qwen3
    from flax import nnx
    from dspark_jax.models.transformer import Transformer
    from dspark_jax.target import Target
    cfg = dataclasses.replace(tiny_qwen3(num_layers=2), bos_token_id=2, eos_token_ids=(1,))
    clean = Target(cfg, *nnx.split(Transformer(cfg, rngs=nnx.Rngs(3))), CharTokenizer(), "tiny-qwen3")
    _, _, t, bystander, expected = _case(clean)
    broken = poisoned(clean, t)
    d = random_drafter(broken, "dspark", gamma=3, num_layers=1)
    with serving(broken, d) as (url, _):
        bad_prompt = "ab" + chr(t - 3)  # the character tokenizer maps it to token t
        r = httpx.post(f"{url}/v1/completions", json=dict(prompt=bad_prompt, max_tokens=5, temperature=0), timeout=60)
        err = _error(r, 500)
        assert err["code"] == "generation_failed" and "not finite" in err["message"]
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json=dict(prompt=bad_prompt, max_tokens=5, temperature=0, stream=True)) as r:
            events = [line for line in r.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        payloads = [json.loads(e[6:]) for e in events[:-1]]
        assert payloads[-2]["choices"][0]["finish_reason"] == "error" and "error" in payloads[-1]
        ok = httpx.post(f"{url}/v1/completions", timeout=60, json=dict(
            prompt=broken.tokenizer.decode(bystander[1:]), max_tokens=12, temperature=0))
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["text"] == broken.tokenizer.decode([x for x in expected if x != 1])


@pytest.mark.slow
def test_server_greedy_output_equals_dspark_generate():
    """The embedded Gemma 3 270M with the shipped drafter: the server's greedy completions are the library's
    (`generate_text`, what `dspark generate` prints) for the same prompts."""
    from dspark_jax.drafters.factory import default_drafter
    from dspark_jax.generation import GenerationConfig, generate_text
    from dspark_jax.target import load_target
    real = load_target()
    prompts = ["Question: A shop sells pens at 3 dollars each. How much do 7 pens cost?\n\nAnswer:",
               "def fibonacci(n):"]
    offline = generate_text(real, prompts, GenerationConfig(max_new_tokens=24, batch_size=2))
    with serving(real, default_drafter(real), max_len=128, buckets=(2, 16)) as (url, _):
        c = client(url)
        for prompt, want in zip(prompts, offline):
            got = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
            assert got == want.completion_text


SERVER_SCRIPT = r"""
from dspark_jax.utils.compile_cache import enable_compilation_cache
enable_compilation_cache()  # the suite's cache ($DSPARK_XLA_CACHE)
from dspark_jax.drafters.factory import random_drafter
from dspark_jax.server.app import create_app, serve
from dspark_jax.server.backend import Backend
from dspark_jax.serving.cost_table import CostTable
from dspark_jax.serving.engine import Engine, EngineConfig
from dspark_jax.testing.tiny_target import make_tiny_target
target = make_tiny_target()
engine = Engine(target, random_drafter(target, "dspark", gamma=3, num_layers=1),
                EngineConfig(slots=2, max_len=64, policy="fixed"), cost_table=CostTable((2, 8), (10.0, 5.0)))
serve(create_app(Backend(engine), "tiny"), "127.0.0.1", {port}, log_level="warning", graceful_s=60)
"""


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "serve.py"
    script.write_text(SERVER_SCRIPT.format(port=port))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json=dict(prompt="in flight", max_tokens=30, temperature=0, stream=True)) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)  # mid-stream
            rest = [line for line in lines if line]
        assert first.startswith("data: ") and rest[-1] == "data: [DONE]"  # the stream was finished, not cut
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

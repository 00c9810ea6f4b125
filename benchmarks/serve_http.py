"""HTTP overhead of `dspark serve`: the same closed-loop load through the OpenAI-compatible server (uvicorn on
loopback, streaming and non-streaming) and directly on the in-process engine, side by side in one run.

    python benchmarks/serve_http.py [--concurrency 1,4,8 --requests_per_client 3 --max_new_tokens 32
                                     --drafter ngram --policy fixed --slots 8]

C clients each send their next request when the previous one finishes (prompts: gsm8k / humaneval / mt-bench,
training format, T = 0). Per mode and concurrency: aggregate tokens/s, p50 / p95 request latency, and the
tokens/s overhead of HTTP against the in-process engine. Writes JSON (default benchmarks/results/serve_http.json).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import threading
import time


def closed_loop(send, prompts, concurrency: int, per_client: int) -> dict:
    """Runs `send(prompt) -> tokens` from C client threads; aggregate tokens/s and latency percentiles."""
    latencies, tokens = [], []
    lock = threading.Lock()

    def client(c):
        for j in range(per_client):
            prompt = prompts[(c * per_client + j) % len(prompts)]
            t0 = time.perf_counter()
            n = send(prompt)
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens.append(n)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return dict(tokens_per_s=sum(tokens) / wall, p50_s=statistics.median(latencies),
                p95_s=latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], requests=len(latencies),
                tokens=sum(tokens))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--requests_per_client", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--drafter", default="ngram")
    ap.add_argument("--policy", default="fixed")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max_len", type=int, default=256)
    ap.add_argument("--output", default="benchmarks/results/serve_http.json")
    args = ap.parse_args()

    import httpx
    import uvicorn

    from dspark_jax.cli.common import load_target_and_drafter
    from dspark_jax.evaluation.datasets import load_benchmarks
    from dspark_jax.server.app import create_app
    from dspark_jax.server.backend import Backend
    from dspark_jax.serving.engine import Engine, EngineConfig
    from dspark_jax.serving.requests import Request
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    target, drafter = load_target_and_drafter("gemma3-270m", args.drafter)
    sets = load_benchmarks(["gsm8k", "humaneval", "mt-bench"])
    room = args.max_len - args.max_new_tokens - drafter.config.block_size - 1
    prompts = [p for group in zip(*[b.prompts for b in sets]) for p in group  # training format already
               if len(target.tokenizer.encode(p, add_bos=True)) <= room][:48]
    engine = Engine(target, drafter, EngineConfig(slots=args.slots, max_len=args.max_len, policy=args.policy))
    server = uvicorn.Server(uvicorn.Config(create_app(Backend(engine), "gemma3-270m"), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1/completions"
    body = dict(max_tokens=args.max_new_tokens, temperature=0)
    http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))

    def in_process(prompt):
        rid = engine.submit(Request(prompt_ids=target.tokenizer.encode(prompt, add_bos=True),
                                    max_new_tokens=args.max_new_tokens))
        return len(engine.result(rid))

    def over_http(prompt):
        r = http.post(url, json=dict(body, prompt=prompt))
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    def streamed(prompt):
        n = 0
        with http.stream("POST", url, json=dict(body, prompt=prompt, stream=True,
                                                stream_options={"include_usage": True})) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        n = event["usage"]["completion_tokens"]
        return n

    closed_loop(in_process, prompts, 2, 1)  # warm-up
    closed_loop(over_http, prompts, 2, 1)
    rows = []
    print(f"machine: {describe_machine()}; drafter {args.drafter}, policy {args.policy}, {args.slots} slots, "
          f"{args.max_new_tokens} new tokens, T=0")
    print(f"{'concurrency':>11} {'mode':<10} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7} {'vs engine':>9}")
    for c in [int(x) for x in args.concurrency.split(",")]:
        base = None
        for mode, send in (("engine", in_process), ("http", over_http), ("http+sse", streamed)):
            r = closed_loop(send, prompts, c, args.requests_per_client)
            base = base or r["tokens_per_s"]
            r.update(concurrency=c, mode=mode, relative_tokens_per_s=r["tokens_per_s"] / base)
            rows.append(r)
            print(f"{c:>11} {mode:<10} {r['tokens_per_s']:9.1f} {r['p50_s']:7.2f} {r['p95_s']:7.2f} "
                  f"{r['relative_tokens_per_s']:9.2f}", flush=True)
    server.should_exit = True
    thread.join(timeout=60)
    write_result(args.output, dict(machine=describe_machine(), **vars(args), rows=rows))


if __name__ == "__main__":
    main()

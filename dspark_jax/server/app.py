"""The OpenAI-compatible routes of `dspark serve`.

    POST /v1/completions          raw prompt → text (stream: server-sent events ending in `data: [DONE]`)
    POST /v1/chat/completions     messages rendered with the model's chat template (`server.chat`)
    GET  /v1/models               the served model
    GET  /health                  200 while the engine loop runs, 503 otherwise
    GET  /metrics                 Prometheus exposition (`prometheus_client`): server and governance metrics
    GET  /snapshot.json           the governance snapshot (with a policy; for `dspark report --snapshot`)

With API keys configured every /v1 route needs `Authorization: Bearer <key>` (401 otherwise); the key names
the tenant the policy admits (403 forbidden class, 429 + Retry-After over quota). `usage` carries OpenAI's
token counts plus `rounds` (verification rounds), `accepted_draft_tokens` and `accept_length` (τ: committed
tokens per round, bonus included). Where a `stop` string ends the text, `completion_tokens` counts the tokens up to
the one that completed it — what the client got; tokens the engine committed past it are compute spent (the
engine's and governance's counters count them), not completion. A client that disconnects cancels its request.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dspark_jax.governance.prometheus import GovernorCollector
from dspark_jax.server.auth import ApiKeys, bearer_token
from dspark_jax.server.backend import Backend, Sampling
from dspark_jax.server.chat import NoChatTemplate, render_chat
from dspark_jax.server.errors import ApiError
from dspark_jax.server.protocol import ChatCompletionRequest, CompletionRequest
from dspark_jax.server.text import TextStream

CLASS_HEADER = "x-workload-class"


class ServerMetrics:
    """Per-replica HTTP-level metrics (governance metrics join the same registry when a policy is in force)."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("dspark_http_requests", "HTTP requests by route and status.", ["route", "status"],
                                registry=registry)
        self.tokens = Counter("dspark_http_tokens", "Tokens served, by kind (prompt / completion).", ["kind"],
                              registry=registry)
        self.in_flight = Gauge("dspark_http_in_flight_requests", "Generation requests being served.",
                               registry=registry)
        self.first_token = Histogram("dspark_http_first_token_seconds", "Time from request to first token.",
                                     registry=registry)
        self.latency = Histogram("dspark_http_request_seconds", "Time from request to last token.",
                                 registry=registry)


def create_app(backend: Backend, model_name: str, keys: ApiKeys | None = None,
               registry: CollectorRegistry | None = None) -> FastAPI:
    """The FastAPI app on `backend`; its lifespan starts the engine loop and shuts it down at exit (uvicorn
    finishes in-flight requests first on SIGTERM). keys None: an open server (no tenants)."""
    registry = registry or CollectorRegistry(auto_describe=False)
    metrics = ServerMetrics(registry)
    governor = backend.governed.governor if backend.governed is not None else None
    if governor is not None:
        registry.register(GovernorCollector(governor))
    tokenizer = backend.engine.target.tokenizer
    created = int(time.time())

    async def lifespan(app):
        backend.start()
        yield
        backend.shutdown()

    app = FastAPI(title="dspark serve", lifespan=lifespan)
    app.state.backend, app.state.registry = backend, registry

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            error = ApiError(400, f"the request body is not valid JSON: {err.get('msg', '')}", None, "invalid_json")
        else:
            field = ".".join(loc) or None
            message = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
            error = ApiError(400, f"{field}: {message}" if field else message, field, "invalid_value")
        metrics.requests.labels(request.url.path, "400").inc()
        return error.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return ApiError(404, f"no route {request.method} {request.url.path}", None, "not_found").response()

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc):
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}", None,
                        "method_not_allowed").response()

    def tenant_of(request: Request) -> str | None:
        if keys is None:
            return None
        presented = bearer_token(request.headers.get("authorization"))
        tenant = keys.tenant(presented)
        if tenant is None:
            raise ApiError(401, "missing API key (Authorization: Bearer <key>)" if presented is None
                           else "invalid API key", None, "invalid_api_key")
        return tenant

    def check_serving() -> None:
        if not backend.healthy:
            raise ApiError(503, "the engine is not running", None, "engine_down")

    @app.get("/health")
    async def health():
        ok = backend.healthy
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/snapshot.json")
    async def snapshot():
        if governor is None:
            raise ApiError(404, "no governance policy is in force (start with --policy)", None, "not_found")
        return JSONResponse(governor.snapshot())

    @app.get("/v1/models")
    async def models(request: Request):
        tenant_of(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dspark"}]}

    def check_model(requested: str | None) -> None:
        """404 model_not_found for a model this server does not serve (as OpenAI answers); None: the served one."""
        if requested is not None and requested != model_name:
            raise ApiError(404, f"the model {requested!r} does not exist here: this server serves {model_name!r} "
                                "(GET /v1/models)", "model", "model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        tenant = tenant_of(request)
        check_model(body.model)
        check_serving()
        if isinstance(body.prompt, str):
            ids, text = tokenizer.encode(body.prompt, add_bos=True), body.prompt
        else:
            ids, text = list(body.prompt), ""
        return await generate(request, body, tenant, ids, text, "prompt", "max_tokens", body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        tenant = tenant_of(request)
        check_model(body.model)
        check_serving()
        try:
            ids = render_chat(tokenizer, [("system" if m.role == "developer" else m.role, m.text)
                                          for m in body.messages])
        except NoChatTemplate as e:
            raise ApiError(400, str(e), "messages", "no_chat_template") from None
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        text = "\n".join(m.text for m in body.messages)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return await generate(request, body, tenant, ids, text, "messages", param, body.max_new_tokens, chat=True)

    async def generate(request: Request, body, tenant, ids, text, prompt_param, max_param, max_new, chat: bool):
        route = request.url.path
        workload_class = body.workload_class or request.headers.get(CLASS_HEADER)
        t0 = time.perf_counter()
        sampling = Sampling(max_new, body.temperature, body.top_p, body.top_k, body.seed)
        rid = backend.submit(tenant, ids, text, sampling, workload_class, prompt_param, max_param)
        metrics.in_flight.inc()
        completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        stream = TextStream(tokenizer, body.stop_strings)
        first = [True]
        pushed = [0]  # tokens handed to the text stream: with a stop string, the completion's tokens

        async def deltas() -> AsyncIterator[str]:
            try:
                async for token in backend.tokens(rid):
                    if first[0]:
                        metrics.first_token.observe(time.perf_counter() - t0)
                        first[0] = False
                    pushed[0] += 1
                    delta = stream.push(token)
                    if delta:
                        yield delta
                    if stream.stopped:
                        backend.cancel(rid)
                        break
                rest = stream.finish()
                if rest:
                    yield rest
            finally:
                backend.cancel(rid)  # a no-op once finished; frees the slot of a client that went away

        def outcome() -> tuple[str, dict, str | None]:
            st = backend.stats(rid)
            reason = "stop" if stream.stopped else {"length": "length", "stop": "stop"}.get(st.finish_reason,
                                                                                            "error")
            # a stop string ends the completion at the token that completed it: tokens the engine committed past
            # it (the rest of its last round, steps before the cancel took effect) are not the client's
            completion = min(pushed[0], st.output_tokens) if stream.stopped else st.output_tokens
            usage = dict(prompt_tokens=st.prompt_tokens, completion_tokens=completion,
                         total_tokens=st.prompt_tokens + completion, rounds=st.rounds,
                         accepted_draft_tokens=st.accepted_draft, accept_length=st.accept_length)
            metrics.tokens.labels("prompt").inc(st.prompt_tokens)
            metrics.tokens.labels("completion").inc(completion)
            metrics.latency.observe(time.perf_counter() - t0)
            error = None
            if reason == "error":
                error = st.error or f"the request ended with {st.finish_reason!r}"
            return reason, usage, error

        def chunk(delta: str | None, reason: str | None) -> dict:
            if chat:
                payload = {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": payload, "finish_reason": reason}
                return {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": model_name, "choices": [choice]}
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            return {"id": completion_id, "object": "text_completion", "created": int(time.time()),
                    "model": model_name, "choices": [choice]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events():
                try:
                    if chat:
                        role = chunk(None, None)
                        role["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                        yield _sse(role)
                    async for delta in deltas():
                        yield _sse(chunk(delta, None))
                    await _finished(backend, rid)
                    reason, usage, error = outcome()
                    yield _sse(chunk(None, reason))
                    if error:
                        yield _sse(ApiError(500, error, None, "generation_failed").body())
                    if include_usage:
                        final = chunk(None, None)
                        final["choices"], final["usage"] = [], usage
                        yield _sse(final)
                    yield "data: [DONE]\n\n"
                    metrics.requests.labels(route, "200").inc()
                finally:
                    metrics.in_flight.dec()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        watcher = asyncio.create_task(_cancel_on_disconnect(request, backend, rid))
        try:
            text_out = "".join([d async for d in deltas()])
            await _finished(backend, rid)
        finally:
            watcher.cancel()
            metrics.in_flight.dec()
        reason, usage, error = outcome()
        if error:
            raise ApiError(500, error, None, "generation_failed")
        metrics.requests.labels(route, "200").inc()
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text_out}, "finish_reason": reason,
                      "logprobs": None}
            return {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
                    "model": model_name, "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text_out, "logprobs": None, "finish_reason": reason}
        return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": [choice], "usage": usage}

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, allow_nan=False)}\n\n"


async def _finished(backend: Backend, rid: int) -> None:
    """Waits (off the event loop) until the engine has finished the request and its stats are final."""
    await asyncio.to_thread(backend.wait, rid)


async def _cancel_on_disconnect(request: Request, backend: Backend, rid: int) -> None:
    while True:
        await asyncio.sleep(0.1)
        if await request.is_disconnected():
            backend.cancel(rid)
            return


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), for `serve` — bound before the slow start (loading,
    compiling), so a busy port or a bad host fails at once — the way uvicorn binds it itself (IPv6 where the host
    has a colon, else IPv4, so "localhost" is 127.0.0.1; SO_REUSEADDR: a port in TIME_WAIT is free). Raises
    ValueError naming the address."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # socket.gaierror (an unknown host) included
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(app: FastAPI, host: str, port: int, log_level: str = "info", graceful_s: float = 300,
          sock: socket.socket | None = None) -> None:
    """Runs the app with uvicorn until SIGTERM / SIGINT: the listener closes, in-flight requests finish (up to
    `graceful_s`), the engine stops; SIGTERM then exits with status 0 (uvicorn re-raises the signal it caught
    after shutting down; the handler installed here turns that into a clean exit). sock: a socket already bound
    (`listening_socket`) to serve on instead of binding host:port."""
    import signal
    import sys

    import uvicorn

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_s)
    uvicorn.Server(config).run(sockets=None if sock is None else [sock])

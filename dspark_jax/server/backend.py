"""The engine behind the server: one submit / stream / cancel API over an open `Engine` (no tenants) or a
`GovernedEngine` (admission by the tenant's policy), with the engine loop in its background thread.

Engine tokens reach the asyncio event loop through one pump thread per request (it blocks on the engine's
stream and hands each token to the loop); cancelling a request ends its stream at the next engine step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import AsyncIterator, Sequence

from dspark_jax.governance.governor import RequestRejected
from dspark_jax.serving.engine import Engine
from dspark_jax.serving.requests import Request, RequestError, RequestStats
from dspark_jax.server.errors import ApiError

REJECTION_STATUS = {"unknown_tenant": 403, "unknown_class": 400, "class_not_allowed": 403, "context_budget": 400,
                    "invalid_override": 400, "override_forbidden": 403, "sampling_limit": 400,
                    "quota_exceeded": 429, "invalid_request": 400, "store_unavailable": 503}
REJECTION_PARAM = {"unknown_class": "workload_class", "class_not_allowed": "workload_class",
                   "context_budget": "max_tokens", "sampling_limit": None}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What a request asks for; None = the default (the workload class's under a policy, else OpenAI's:
    temperature 1, top_p 1, no top-k). max_new_tokens None = as many as fit in the slot."""
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None


class Backend:
    """engine: a started or startable Engine; governed: the GovernedEngine on it when a policy is in force."""

    def __init__(self, engine: Engine, governed=None):
        self.engine, self.governed = engine, governed
        self.block = engine.block

    @property
    def max_len(self) -> int:
        return self.engine.config.max_len

    def room(self, prompt_tokens: int) -> int:
        """New tokens that fit in a slot after a prompt (the draft block needs G + 1 rows past the end)."""
        return self.max_len - prompt_tokens - self.block - 1

    def start(self) -> None:
        self.engine.start()

    def shutdown(self) -> None:
        if self.governed is not None:
            self.governed.shutdown()
        else:
            self.engine.shutdown()

    @property
    def healthy(self) -> bool:
        return self.engine.alive

    def submit(self, tenant: str | None, prompt_ids: Sequence[int], prompt_text: str, sampling: Sampling,
               workload_class: str | None, prompt_param: str, max_tokens_param: str) -> int:
        """Queues the request; returns the engine id. Raises ApiError (400 / 403 / 429 / 503) naming the field."""
        n = len(prompt_ids)
        room = self.room(n)
        if room < 1:
            raise ApiError(400, f"the prompt has {n} tokens; a slot holds {self.max_len} tokens including "
                                f"{self.block + 1} for drafts, so no new token fits", prompt_param,
                           "context_length_exceeded")
        if sampling.max_new_tokens is not None and sampling.max_new_tokens > room:
            raise ApiError(400, f"{max_tokens_param}={sampling.max_new_tokens} does not fit: the prompt has {n} "
                                f"tokens and a slot holds {self.max_len} (at most {room} new tokens)",
                           max_tokens_param, "context_length_exceeded")
        vocab = self.engine.target.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", prompt_param)
        max_new = sampling.max_new_tokens if sampling.max_new_tokens is not None else room
        try:
            if self.governed is None:
                return self.engine.submit(Request(
                    prompt_ids=list(prompt_ids), max_new_tokens=max_new,
                    temperature=1.0 if sampling.temperature is None else sampling.temperature,
                    top_k=sampling.top_k or 0, top_p=1.0 if sampling.top_p is None else sampling.top_p,
                    seed=sampling.seed))
            # unset max_new_tokens: the class default (the engine refuses it if it does not fit: 400 below)
            return self.governed.submit(tenant, prompt_ids=list(prompt_ids), workload_class=workload_class,
                                        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                        top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed)
        except RequestRejected as e:
            status = REJECTION_STATUS.get(e.code, 400)
            raise ApiError(status, e.reason, REJECTION_PARAM.get(e.code), e.code,
                           retry_after_s=e.retry_after_s if status in (429, 503) else None) from None
        except RequestError as e:
            raise ApiError(400, str(e), _param_of(str(e), prompt_param, max_tokens_param)) from None

    async def tokens(self, rid: int) -> AsyncIterator[int]:
        """The request's tokens as the engine commits them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()

        def pump():
            try:
                for token in self.engine.stream(rid):
                    loop.call_soon_threadsafe(queue.put_nowait, token)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=pump, name=f"dspark-stream-{rid}", daemon=True).start()
        while (token := await queue.get()) is not None:
            yield token

    def cancel(self, rid: int) -> None:
        self.engine.cancel(rid)

    def stats(self, rid: int) -> RequestStats:
        return self.engine.stats(rid)

    def wait(self, rid: int, timeout: float | None = None) -> None:
        self.engine.result(rid, timeout)


def _param_of(message: str, prompt_param: str, max_tokens_param: str) -> str | None:
    if "max_new_tokens" in message:
        return max_tokens_param
    if "prompt" in message:
        return prompt_param
    for name in ("temperature", "top_k", "top_p"):
        if name in message:
            return name
    return None

"""The generation driver: what the HTTP routes need from whatever produces tokens.

The routes (``serve/routes/``) speak OpenAI; a driver turns a validated request into a
running generation. ``LocalDriver`` (``serve/local.py``) runs the in-process engine; a
gateway driver would forward to an upstream OpenAI-compatible server. A driver:

- ``check(model, kind)``: 503 while loading, 404 for another model id, 400 for the wrong kind;
- ``prepare(body) -> Job``: tokenize and check lengths (400/413), before any budget is taken;
- ``start(job, ledger) -> Generation``: submit (429 queue full, 503 shutting down);
- ``embed(body)``, ``classify(body)``, ``models()``, ``reload()`` for the other routes.

A ``Generation`` yields ``Piece`` and ``Done`` events, one ``Done`` per choice; streaming
and non-streaming responses are both built from them (non-streaming collects the stream).
The driver fills the ``Ledger`` as tokens are produced, from whichever thread produces
them; the ledger completes when every choice has finished (stop, length, error, or
cancelled because the client went away), so the routes can charge rate limits, count
tokens and write the audit line at every exit path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from homeforge.serve.protocol import ChatRequest, CompletionRequest, EmbeddingRequest


@dataclass
class TokenLogprob:
    """One token's text, log-probability (None for the first prompt token) and top alternatives."""

    token: str
    logprob: float | None
    top: list[tuple[str, float]] | None = None


@dataclass
class Piece:
    """New text of choice ``index``; ``logprobs`` only when asked; ``prompt`` for the echoed prompt."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None
    prompt: bool = False


@dataclass
class Done:
    index: int
    reason: str  # "stop" | "length" | "error" | "cancelled"
    error: str | None = None


@dataclass
class Job:
    """A prepared request: what it costs before it runs (the rate limiter reserves ``budget``)."""

    choices: int
    prompt_tokens: int  # over all choices
    max_tokens: int  # per choice
    audit_prompt: str = ""  # the request's text for the audit log (only logged when enabled)

    @property
    def budget(self) -> int:
        return self.prompt_tokens + self.max_tokens * self.choices


class Ledger:
    """Token accounting of one generation, complete at every exit path. Thread-safe.

    ``token`` per generated delta, ``finish`` per choice (with the producer's own count when
    it has one); ``close`` finishes what is left with the tokens seen (a producer that died
    or a server stopping). Callbacks given to ``when_done`` run once, when every choice has
    finished, in the thread that finished the last one.
    """

    def __init__(self, choices: int, prompt_tokens: int, keep_text: bool = False):
        self.prompt_tokens = prompt_tokens
        self.completion = [0] * choices
        self.seen = [0] * choices
        self.reasons: list[str | None] = [None] * choices
        self.ttft: list[float] = []
        self.texts: list[str] | None = [""] * choices if keep_text else None
        self.started = time.perf_counter()
        self._first = [False] * choices
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Ledger], Any]] = []
        self.done = False

    @property
    def completion_tokens(self) -> int:
        return sum(self.completion)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def _first_token(self, i: int) -> None:
        if not self._first[i]:
            self._first[i] = True
            self.ttft.append(time.perf_counter() - self.started)

    def token(self, i: int, text: str, n: int = 1) -> None:
        with self._lock:
            self._first_token(i)
            self.seen[i] += n
            if self.texts is not None:
                self.texts[i] += text

    def finish(self, i: int, reason: str, completion_tokens: int | None = None) -> None:
        with self._lock:
            if self.done or self.reasons[i] is not None:
                return
            if reason == "stop" and not self._first[i]:
                self._first_token(i)  # the first token was a stop token
            self.reasons[i] = reason
            self.completion[i] = self.seen[i] if completion_tokens is None else completion_tokens
            callbacks = self._complete_if_done()
        self._run(callbacks)

    def close(self, reason: str = "cancelled") -> None:
        with self._lock:
            for i, r in enumerate(self.reasons):
                if r is None:
                    self.reasons[i], self.completion[i] = reason, self.seen[i]
            callbacks = self._complete_if_done()
        self._run(callbacks)

    def when_done(self, callback: Callable[[Ledger], Any]) -> None:
        with self._lock:
            if not self.done:
                self._callbacks.append(callback)
                return
        self._run([callback])

    def _complete_if_done(self) -> list:
        if self.done or any(r is None for r in self.reasons):
            return []
        self.done = True
        callbacks, self._callbacks = self._callbacks, []
        return callbacks

    def _run(self, callbacks: list) -> None:
        for cb in callbacks:
            try:
                cb(self)
            except Exception:  # accounting must never break the producer (an engine thread, a stream)
                pass

    def audit_fields(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "finish_reasons": list(self.reasons)}


class Generation(Protocol):
    ledger: Ledger

    def events(self, gone: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[Piece | Done]:
        """Pieces and one Done per choice; stops early (without Done) when ``gone()`` turns true."""
        ...

    def cancel(self) -> None:
        """Stop producing (idempotent, synchronous: safe in a cancelled task's ``finally``)."""
        ...


class Driver(Protocol):
    name: str

    def check(self, model: str | None, kind: str = "causal") -> None: ...

    def prepare(self, body: CompletionRequest | ChatRequest) -> Job: ...

    def start(self, job: Job, ledger: Ledger) -> Generation: ...

    async def embed(self, body: EmbeddingRequest) -> tuple[list[dict], int]: ...

    async def classify(self, texts: list[str]) -> tuple[list[dict], int]: ...

    def models(self) -> list[dict]: ...

    async def reload(self) -> None: ...

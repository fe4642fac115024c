"""One generation relayed from an upstream: failover before the first token, clean errors after it.

A streaming request is sent to the upstream as a stream (``stream_options.include_usage``);
its chunks become ``Piece`` events as they arrive, token by token. Until the first piece has
gone towards the client, any failure (refused connection, the upstream dying, a 5xx or 429,
a stream cut short) sends the request to the next upstream, unseen by the client; the HTTP
status is chosen only then (``opened``). After it, a failure ends the unfinished choices
with ``finish_reason: error`` and an error event, never a hang (the upstream's silence is
bounded by ``read_timeout``). A non-streaming request is one JSON call with the same
failover at any point, since nothing reaches the client before the whole answer.

Accounting: the ledger gets each piece as it is relayed and, at the end, the upstream's
``usage`` (prompt and completion tokens); a client that leaves is charged the prompt and
the tokens relayed so far, and the upstream request is closed (the upstream stops).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from homeforge.serve.driver import Done, Ledger, Piece, TokenLogprob
from homeforge.serve.errors import ApiError
from homeforge.serve.gateway.job import GatewayJob, Refusal, refusal
from homeforge.serve.gateway.pool import Upstream

if TYPE_CHECKING:
    from homeforge.serve.gateway.driver import GatewayDriver

END = object()


class Broken(Exception):
    """The upstream failed during the answer (cut stream, error event, malformed chunk)."""


class GatewayGeneration:
    def __init__(self, driver: GatewayDriver, job: GatewayJob, ledger: Ledger):
        self.d, self.job, self.ledger = driver, job, ledger
        self.chat = job.path.endswith("chat/completions")
        n = job.choices
        self.texts, self.chunks, self.reasons = [""] * n, [0] * n, [None] * n
        self.usage: dict | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = False  # a piece went towards the client: no failover any more
        self.task: asyncio.Task | None = None
        self.up: Upstream | None = None  # the upstream of the current attempt
        self._opened: asyncio.Future | None = None

    def begin(self) -> None:
        loop = asyncio.get_running_loop()
        self._opened = loop.create_future()
        if not self.job.stream:
            self._opened.set_result(None)  # nothing is sent before the whole answer: fail over at any point
        self.task = loop.create_task(self._run(), name="homeforge-relay")

    async def opened(self) -> None:
        try:
            await asyncio.shield(self._opened)
        except asyncio.CancelledError:
            self.cancel()
            raise

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self._opened is not None and not self._opened.done():
            self._opened.cancel()
        if not self.ledger.done:  # charged what was relayed: the prompt and the tokens so far
            self.ledger.prompt_tokens = self._prompt_tokens()
            for i, r in enumerate(self.reasons):
                if self.ledger.reasons[i] is None:
                    self.ledger.finish(i, "cancelled" if r is None else r, self._count(i))

    async def events(self, gone: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[Piece | Done]:
        checked = time.monotonic()
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), 0.5)
            except asyncio.TimeoutError:
                item = None
            if gone is not None and time.monotonic() - checked > 0.5:  # also while pieces keep coming
                checked = time.monotonic()
                if await gone():
                    return
            if item is END:
                return
            if isinstance(item, ApiError):
                raise item
            if item is not None:
                yield item

    # ------------------------------------------------------------------ the relay

    async def _run(self) -> None:
        pool = self.d.pool
        tried: set = set()
        reasons: list[Refusal] = []
        try:
            if not self.job.stream:
                obj, up = await self.d.forward(self.job.path, lambda u: self.job.payload(u, False), self.job.model)
                self._whole(obj)
                self._end(up)
                return
            while (up := pool.pick(self.job.model, tried)) is not None:
                tried.add(up)
                self.up = up
                try:
                    with pool.using(up):
                        await self._stream_from(up)
                except Refusal as exc:
                    if not exc.retry:
                        raise exc.error from None
                    reasons.append(exc)
                    pool.outcomes.labels(up.url, "retried").inc()
                    continue
                except Broken as exc:
                    pool.failed(up, str(exc))
                    if self.started:
                        pool.outcomes.labels(up.url, "broken").inc()
                        self._break(up)
                        return
                    reasons.append(Refusal(up, str(exc), retry=True))
                    pool.outcomes.labels(up.url, "retried").inc()
                    self._reset()
                    continue
                pool.outcomes.labels(up.url, "ok").inc()
                self._end(up)
                return
            raise self.d.exhausted(reasons)
        except asyncio.CancelledError:
            raise
        except ApiError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug or an unforeseen answer: the client gets an error, the ledger completes
            self._fail(ApiError(502, f"relaying the upstream's answer failed: {type(exc).__name__}: {exc}",
                                "server_error", code="upstream_failed"))

    async def _stream_from(self, up: Upstream) -> None:
        import httpx

        try:
            req = up.client.build_request("POST", self.job.path, json=self.job.payload(up, True))
            resp = await up.client.send(req, stream=True)
            try:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise refusal(up, resp.status_code, resp.content, self.d.pool)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    self._chunk(json.loads(data))
            finally:
                await resp.aclose()
        except httpx.HTTPError as exc:
            raise Broken(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        except ValueError as exc:
            raise Broken(f"a malformed chunk: {exc}") from None
        if not all(self.reasons):
            raise Broken("the upstream ended the stream before every choice finished")

    def _chunk(self, obj: dict) -> None:
        if not isinstance(obj, dict):
            raise Broken("a chunk that is not a JSON object")
        if obj.get("error") and not obj.get("choices"):
            err = obj["error"]
            raise Broken(f"an error event: {err.get('message') if isinstance(err, dict) else err}")
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        for c in obj.get("choices") or []:
            i = c.get("index", 0)
            if not isinstance(i, int) or not 0 <= i < len(self.reasons):
                raise Broken(f"a chunk for choice {i!r} of {len(self.reasons)}")
            text = (c.get("delta") or {}).get("content") if self.chat else c.get("text")
            lp = _logprobs(c.get("logprobs"), self.chat)
            if text or lp:
                self._piece(i, text or "", lp)
            if c.get("finish_reason"):
                self.reasons[i] = c["finish_reason"]

    def _whole(self, obj: dict) -> None:
        """A non-streaming answer: one piece per choice."""
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) != len(self.reasons):
            raise ApiError(502, f"the upstream answered {len(choices or [])} choices for {len(self.reasons)}",
                           "server_error", code="upstream_failed")
        for k, c in enumerate(choices):
            i = c.get("index", k) if isinstance(c, dict) else None
            if not isinstance(i, int) or not 0 <= i < len(self.reasons):
                raise ApiError(502, f"the upstream answered choice {i!r} of {len(self.reasons)}", "server_error",
                               code="upstream_failed")
            text = ((c.get("message") or {}).get("content") if self.chat else c.get("text")) or ""
            self._piece(i, text, _logprobs(c.get("logprobs"), self.chat), whole=True)
            self.reasons[i] = c.get("finish_reason") or "stop"
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]

    def _piece(self, i: int, text: str, lp: list[TokenLogprob] | None, whole: bool = False) -> None:
        n = len(lp) if lp else (0 if whole else 1)
        self.texts[i] += text
        self.chunks[i] += n
        self.ledger.token(i, text, n)
        self.queue.put_nowait(Piece(i, text, lp))
        if not self.started:
            self.started = True
            if not self._opened.done():
                self._opened.set_result(None)

    def _reset(self) -> None:
        n = len(self.reasons)
        self.texts, self.chunks, self.reasons, self.usage = [""] * n, [0] * n, [None] * n, None

    # ------------------------------------------------------------------ endings

    def _prompt_tokens(self) -> int:
        n = (self.usage or {}).get("prompt_tokens")
        return n if isinstance(n, int) and n >= 0 else self.job.prompt_tokens

    def _count(self, i: int) -> int:
        """Completion tokens of choice ``i`` without the upstream's usage: tokenizer, chunks, or an estimate."""
        if self.d.tok is not None:
            return self.d.count(self.texts[i])
        return self.chunks[i] or math.ceil(len(self.texts[i]) / 4)

    def _counts(self) -> list[int]:
        local = [self._count(i) for i in range(len(self.reasons))]
        total = (self.usage or {}).get("completion_tokens")
        if not isinstance(total, int) or total < 0:
            return local
        if len(local) == 1:
            return [total]
        out = local[:-1]  # several choices: the upstream's total, split as counted here
        return out + [max(0, total - sum(out))]

    def _end(self, up: Upstream) -> None:
        self.ledger.notes["upstream"] = up.url
        self.ledger.prompt_tokens = self._prompt_tokens()
        done = [Done(i, r or "stop") for i, r in enumerate(self.reasons)]
        for d, n in zip(done, self._counts(), strict=True):
            self.ledger.finish(d.index, d.reason, n)
        for d in done:
            self.queue.put_nowait(d)
        self.queue.put_nowait(END)
        if not self._opened.done():  # a stream without any piece (max_tokens 0, an immediate stop)
            self._opened.set_result(None)

    def _break(self, up: Upstream) -> None:
        """The upstream failed mid-stream: unfinished choices end with an error; the client is told."""
        self.ledger.notes["upstream"] = up.url
        self.ledger.prompt_tokens = self._prompt_tokens()
        why = "the upstream server failed during the answer; retry the request"
        for i, r in enumerate(self.reasons):
            self.ledger.finish(i, r or "error", self._count(i))
            self.queue.put_nowait(Done(i, r or "error", None if r else why))
        self.queue.put_nowait(END)

    def _fail(self, exc: ApiError) -> None:
        """No upstream served the request."""
        if self.started:
            self._break(self.up)
        elif not self._opened.done():  # streaming: the route answers with this error; nothing was charged
            self._opened.set_exception(exc)
        else:  # non-streaming: nothing ran for the client; the ledger completes with nothing charged
            self.ledger.prompt_tokens = 0
            self.ledger.close("error")
            self.queue.put_nowait(exc)


def _logprobs(lp, chat: bool) -> list[TokenLogprob] | None:
    """OpenAI logprobs (chat ``content`` list, or the legacy completions object) as ``TokenLogprob`` items."""
    if not isinstance(lp, dict):
        return None
    if chat:
        items = lp.get("content") or []
        return [TokenLogprob(t.get("token", ""), t.get("logprob"),
                             [(x.get("token", ""), x.get("logprob")) for x in (t.get("top_logprobs") or [])])
                for t in items if isinstance(t, dict)] or None
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or [None] * len(tokens)
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    return [TokenLogprob(t, v, list(top.items()) if isinstance(top, dict) else None)
            for t, v, top in zip(tokens, values, tops, strict=False)] or None

"""/v1/completions and /v1/chat/completions: one path for streaming and non-streaming.

A generation's events become OpenAI chunks (``TextShape`` for completions, ``ChatShape``
for chat). Streaming sends each chunk as a server-sent event; non-streaming merges the
same chunks into one response, the way a client accumulates a stream. Accounting
(rate-limit settlement, token counters, TTFT, the audit line) hangs on the generation's
ledger, which completes at every exit: finish, error, client gone, shutdown.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from homeforge.serve.calls import release, start_generation
from homeforge.serve.driver import Done, Generation, Piece, TokenLogprob
from homeforge.serve.errors import ApiError, error_body
from homeforge.serve.protocol import (
    ChatCompletionResponse,
    ChatRequest,
    CompletionRequest,
    CompletionResponse,
    usage,
)
from homeforge.serve.routes.common import COMMON, errors, server
from homeforge.serve.routes.feedback import capture

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_SSE_DOC = {"text/event-stream": {"schema": {"type": "string", "description": "chunks as server-sent events"}}}
_GEN_ERRORS = errors(*COMMON, 400, 404, 429, 500, 502, 503)


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


class _Shape:
    """How events become choice chunks of one endpoint, and chunks one merged response."""

    route = chunk_object = full_object = prefix = ""

    def __init__(self, name: str, choices: int, logprobs: bool):
        self.id, self.created, self.name = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time()), name
        self.logprobs = logprobs
        self.acc = [self.empty(i) for i in range(choices)]

    fingerprint: str | None = None  # the model version that produced the response (serving a registry alias)
    arm: str | None = None  # live A/B: champion or candidate

    def _version(self) -> dict:
        return {**({"system_fingerprint": self.fingerprint} if self.fingerprint else {}),
                **({"arm": self.arm} if self.arm else {})}

    def wrap(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.name,
                "choices": choices, **self._version(), **extra}

    def response(self, use: dict) -> dict:
        return {"id": self.id, "object": self.full_object, "created": self.created, "model": self.name,
                "choices": [self.final(a) for a in self.acc], "usage": use, **self._version()}

    def opening(self) -> list[dict]:
        return []

    def chunk(self, ev: Piece | Done) -> dict:
        return self.piece(ev) if isinstance(ev, Piece) else self.done(ev)

    def empty(self, i: int) -> dict: ...

    def piece(self, ev: Piece) -> dict: ...

    def done(self, ev: Done) -> dict: ...

    def merge(self, chunk: dict) -> None: ...

    def final(self, acc: dict) -> dict:
        return acc


class TextShape(_Shape):
    route, chunk_object, full_object, prefix = "/v1/completions", "text_completion", "text_completion", "cmpl"

    def __init__(self, name: str, choices: int, logprobs: bool):
        super().__init__(name, choices, logprobs)
        self.offsets = [0] * choices

    def empty(self, i):
        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} if self.logprobs else None
        return {"index": i, "text": "", "logprobs": lp, "finish_reason": None}

    def piece(self, ev):
        lp = None
        if ev.logprobs is not None:
            lp = _legacy(ev.logprobs, self.offsets[ev.index])
        self.offsets[ev.index] += len(ev.text)
        return {"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": None}

    def done(self, ev):
        return {"index": ev.index, "text": "", "logprobs": None, "finish_reason": ev.reason}

    def merge(self, chunk):
        a = self.acc[chunk["index"]]
        a["text"] += chunk["text"]
        if chunk["logprobs"] and a["logprobs"] is not None:
            for k, v in chunk["logprobs"].items():
                a["logprobs"][k] += v
        a["finish_reason"] = chunk["finish_reason"] or a["finish_reason"]


class ChatShape(_Shape):
    route, chunk_object, full_object, prefix = "/v1/chat/completions", "chat.completion.chunk", "chat.completion", \
        "chatcmpl"

    def opening(self):
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(self.acc))]

    def empty(self, i):
        return {"index": i, "message": {"role": "assistant", "content": ""},
                "logprobs": {"content": []} if self.logprobs else None, "finish_reason": None}

    def piece(self, ev):
        lp = {"content": [_chat_lp(t) for t in ev.logprobs]} if self.logprobs and ev.logprobs is not None else None
        return {"index": ev.index, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}

    def done(self, ev):
        return {"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": ev.reason}

    def merge(self, chunk):
        a = self.acc[chunk["index"]]
        a["message"]["content"] += chunk["delta"].get("content", "")
        if chunk["logprobs"] and a["logprobs"] is not None:
            a["logprobs"]["content"] += chunk["logprobs"]["content"]
        a["finish_reason"] = chunk["finish_reason"] or a["finish_reason"]


def _legacy(infos: list[TokenLogprob], offset: int) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in infos:
        out["tokens"].append(t.token)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append(None if t.top is None or t.logprob is None else dict(t.top))
        out["text_offset"].append(offset)
        offset += len(t.token)
    return out


def _chat_lp(t: TokenLogprob) -> dict:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
            "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())} for s, v in (t.top or [])]}


# --------------------------------------------------------------------------- routes


@router.post("/v1/completions", summary="complete a prompt (text or token ids), streaming or not",
             responses={200: {"model": CompletionResponse, "content": _SSE_DOC}, **_GEN_ERRORS})
async def completions(request: Request, body: CompletionRequest):
    return await generate(request, body, TextShape, logprobs=body.logprobs is not None)


@router.post("/v1/chat/completions", summary="answer a conversation (the model's chat template), streaming or not",
             responses={200: {"model": ChatCompletionResponse, "content": _SSE_DOC}, **_GEN_ERRORS})
async def chat_completions(request: Request, body: ChatRequest):
    return await generate(request, body, ChatShape, logprobs=body.logprobs)


async def generate(request: Request, body: CompletionRequest | ChatRequest, shape_cls: type[_Shape],
                   logprobs: bool):
    started = time.perf_counter()
    st = server(request)
    gen, name, choices = await start_generation(st, request.scope.setdefault("state", {}), body, shape_cls.route)
    shape = shape_cls(name, choices, logprobs)
    shape.fingerprint, shape.arm = getattr(gen, "version", None), getattr(gen, "arm", None)
    capture(st, body, shape, gen, started, shape.arm)
    if body.stream:
        usage_chunk = body.stream_options is None or body.stream_options.include_usage
        return StreamingResponse(_stream(gen, shape, usage_chunk, request.is_disconnected),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return await _collect(gen, shape, request.is_disconnected)


async def _stream(gen: Generation, shape: _Shape, usage_chunk: bool, gone):
    finished = 0
    try:
        for c in shape.opening():
            yield sse(shape.wrap([c]))
        async for ev in gen.events(gone):
            yield sse(shape.wrap([shape.chunk(ev)]))
            if isinstance(ev, Done):
                finished += 1
                if ev.reason == "error":  # a clean error event after the choice's last chunk (OpenAI clients raise it)
                    yield sse(error_body(f"generation failed: {ev.error}", "server_error", code="generation_failed"))
        if finished < len(shape.acc):
            return  # the client went away
        if usage_chunk:
            yield sse(shape.wrap([], usage=usage(gen.ledger.prompt_tokens, gen.ledger.completion_tokens)))
        yield b"data: [DONE]\n\n"
    finally:
        release(gen)


async def _collect(gen: Generation, shape: _Shape, gone):
    """Non-streaming: the same chunks as a stream, merged."""
    finished, failed = 0, []
    try:
        async for ev in gen.events(gone):
            if isinstance(ev, Done):
                finished += 1
                if ev.reason == "error":
                    failed.append(ev.error)
            shape.merge(shape.chunk(ev))
    finally:
        release(gen)
    if finished < len(shape.acc):
        return Response(status_code=499)  # the client went away
    if failed:
        raise ApiError(500, f"generation failed: {failed[0]}", "server_error")
    return shape.response(usage(gen.ledger.prompt_tokens, gen.ledger.completion_tokens))

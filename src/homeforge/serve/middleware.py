"""ASGI middleware: the key check before any byte of the body is read, and metrics + audit lines.

``GuardMiddleware`` authenticates (``Authorization: Bearer KEY``), checks the key's role for
the route and its request/token limits, then bounds the body size (a declared
Content-Length, or a chunked body read up to the bound). A caller without a valid key gets
401 whatever it sent. ``ObserveMiddleware`` counts and times every request to its last byte
and writes one audit line per request; for a generation it waits until the generation's
ledger is complete, so tokens are in the line even when the client went away mid-stream.
"""

from __future__ import annotations

import time

from homeforge.errors import HomeforgeError
from homeforge.serve.calls import ACCESS, INFERENCE, PUBLIC, QUIET, ROUTES, authorize, record
from homeforge.serve.errors import error_bytes
from homeforge.serve.state import ServerState

__all__ = ["ACCESS", "INFERENCE", "MAX_BODY_BYTES", "PUBLIC", "QUIET", "ROUTES", "GuardMiddleware",
           "ObserveMiddleware"]
MAX_BODY_BYTES = 32 << 20  # a request body above this is refused (413)


async def _reply(send, status: int, body: bytes, headers: dict | None = None) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Keys, roles and rate limits from the headers alone; then the body-size bound."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            refusal = self.authorize(scope)
        except Exception as exc:  # e.g. a key file edited into invalid JSON: refuse, in the OpenAI shape
            what = exc.what if isinstance(exc, HomeforgeError) else f"{type(exc).__name__}: {exc}"
            refusal = 500, error_bytes(f"cannot check the API key: {what}", "server_error"), None
        if refusal is None:
            refusal, receive = await self.bound_body(scope, receive)
        if refusal is not None:
            return await _reply(send, *refusal)
        return await self.app(scope, receive, send)

    def authorize(self, scope) -> tuple | None:
        """None when the caller may go on; else (status, body, headers). Sets role/key in scope state."""
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        refusal = authorize(self.state, scope.get("path", ""), header, scope.setdefault("state", {}))
        if refusal is None:
            return None
        return refusal.status, error_bytes(refusal.message, refusal.type, refusal.code), refusal.headers

    async def bound_body(self, scope, receive):
        """(refusal, receive): refuse a body over MAX_BODY_BYTES; a chunked body is read here up to it."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return (400, error_bytes("invalid Content-Length header"), None), receive
            if int(length) > MAX_BODY_BYTES:
                return (413, error_bytes(f"the request body is larger than {MAX_BODY_BYTES >> 20} MB"), None), receive
            return None, receive
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            return None, receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, receive  # the client left: let the app see the disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                return (413, error_bytes(f"the request body is larger than {MAX_BODY_BYTES >> 20} MB"), None), receive
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def receive_again():
            return replay.pop() if replay else await receive()

        return None, receive_again


class ObserveMiddleware:
    """Counts every request by route/status/role, times it to the last byte, writes its audit line."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        scope.setdefault("state", {})
        info = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._record(scope, info["status"], time.perf_counter() - t0)

    def _record(self, scope, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        record(self.state, scope.get("state", {}), path if path in ROUTES else "other", scope.get("method"), status,
               seconds, (scope.get("client") or [None])[0])

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
from homeforge.serve.auth import ROLES
from homeforge.serve.errors import error_bytes
from homeforge.serve.state import ServerState

INFERENCE = ("admin", "user")
MAX_BODY_BYTES = 32 << 20  # a request body above this is refused (413)
PUBLIC = frozenset({"/health", "/ready"})
# route -> (roles allowed, counted by the key's rate limits); any other path needs a valid key of any role
ACCESS: dict[str, tuple[tuple[str, ...], bool]] = {
    "/v1/models": (INFERENCE, True),
    "/v1/completions": (INFERENCE, True),
    "/v1/chat/completions": (INFERENCE, True),
    "/v1/embeddings": (INFERENCE, True),
    "/v1/classifications": (INFERENCE, True),
    "/metrics": (("admin", "metrics"), False),
    "/admin/reload": (("admin",), False),
    "/openapi.json": (ROLES, False),
}
ROUTES = frozenset(ACCESS) | PUBLIC
QUIET = frozenset({"/health", "/ready", "/metrics"})  # not written to the audit log


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
        st, rs = self.state, scope.setdefault("state", {})
        path = scope.get("path", "")
        if path in PUBLIC:
            rs.setdefault("role", "none")
            return None
        st.keys.reload_if_changed()
        if not st.keys_required():
            rs["role"] = "anonymous"
            return None
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            return 401, error_bytes("an API key is required: send it as 'Authorization: Bearer KEY'",
                                    "authentication_error", "missing_api_key"), None
        key = st.keys.verify(token)
        if key is None:
            return 401, error_bytes("invalid or revoked API key", "authentication_error", "invalid_api_key"), None
        rs["role"], rs["key_id"], rs["api_key"] = key.role, key.id, key
        roles, limited = ACCESS.get(path, (ROLES, False))
        if key.role not in roles:
            return 403, error_bytes(f"the key's role {key.role!r} may not use {path} (allowed: {', '.join(roles)})",
                                    "permission_error", "forbidden"), None
        if limited:
            why = st.limiter.check(key)
            if why:
                st.metrics.rejected.labels("rate_limit").inc()
                return 429, error_bytes(why, "rate_limit_error", "rate_limit_exceeded"), \
                    {"Retry-After": st.limiter.retry_after(key)}
        return None

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
        st = scope.get("state", {})
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        role = st.get("role", "none")
        m = self.state.metrics
        m.requests.labels(route, str(status), role).inc()
        m.latency.labels(route).observe(seconds)
        if self.state.audit is None or route in QUIET:
            return
        rec = {"event": "serve.request", "route": route, "method": scope.get("method"), "status": status,
               "latency_ms": round(seconds * 1000, 2), "key_id": st.get("key_id"), "role": role,
               "model": st.get("model"), "prompt_tokens": st.get("prompt_tokens"),
               "completion_tokens": st.get("completion_tokens"), "client": (scope.get("client") or [None])[0]}
        if "prompt_text" in st:
            rec["prompt"] = st["prompt_text"]
        ledger = st.get("ledger")
        if ledger is None:
            self._write(rec)
            return

        def write(ledger) -> None:  # once every choice has finished: at once, or later from the engine
            full = {**rec, **ledger.audit_fields()}
            if "prompt" in rec:
                full["completion"] = "\n".join(ledger.texts or [])
            self._write(full)

        ledger.when_done(write)

    def _write(self, rec: dict) -> None:
        audit = self.state.audit
        audit.append(rec)
        self.state.metrics.audit_errors.set(audit.errors)

"""What an API call goes through, whatever carries it (the HTTP routes, gRPC).

The key and role check with the request limits, the token reservation and its settlement,
the start of a generation with its accounting hung on the ledger, and the metrics + audit
record: one implementation, so both transports enforce the same rules.

A call's facts live in a plain dict, ``info``: for HTTP it is the ASGI scope's ``state``
(what ``request.state`` writes to), for gRPC a dict of the call. Keys: ``role``,
``key_id``, ``api_key`` (set by ``authorize``), ``model``, ``prompt_tokens``,
``completion_tokens``, ``prompt_text`` and ``ledger`` (set by the handlers), read by ``record``.
"""

from __future__ import annotations

import asyncio

from homeforge.serve.auth import ROLES
from homeforge.serve.driver import Generation, Ledger
from homeforge.serve.errors import ApiError
from homeforge.serve.state import ServerState

INFERENCE = ("admin", "user", "operator")
PUBLIC = frozenset({"/health", "/ready"})
# route -> (roles allowed, counted by the key's rate limits); any other path needs a valid key of any role
ACCESS: dict[str, tuple[tuple[str, ...], bool]] = {
    "/v1/models": (INFERENCE, True),
    "/v1/completions": (INFERENCE, True),
    "/v1/chat/completions": (INFERENCE, True),
    "/v1/embeddings": (INFERENCE, True),
    "/v1/classifications": (INFERENCE, True),
    "/v1/feedback": (INFERENCE, False),
    "/metrics": (("admin", "metrics"), False),
    "/admin/reload": (("admin",), False),
    "/openapi.json": (ROLES, False),
}
ROUTES = frozenset(ACCESS) | PUBLIC
QUIET = frozenset({"/health", "/ready", "/metrics"})  # not written to the audit log
LEDGER_GRACE_S = 60.0  # after the client left, a producer that never reports is closed with what it sent


def authorize(st: ServerState, path: str, authorization: str, info: dict) -> ApiError | None:
    """None when the caller may go on with ``path`` (an HTTP route); else the refusal. Fills role/key in ``info``."""
    if path in PUBLIC:
        info.setdefault("role", "none")
        return None
    st.keys.reload_if_changed()
    if not st.keys_required():
        info["role"] = "anonymous"
        return None
    token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    if not token:
        return ApiError(401, "an API key is required: send it as 'Authorization: Bearer KEY'",
                        "authentication_error", code="missing_api_key")
    key = st.keys.verify(token)
    if key is None:
        return ApiError(401, "invalid or revoked API key", "authentication_error", code="invalid_api_key")
    info["role"], info["key_id"], info["api_key"] = key.role, key.id, key
    roles, limited = ACCESS.get(path, (ROLES, False))
    if key.role not in roles:
        return ApiError(403, f"the key's role {key.role!r} may not use {path} (allowed: {', '.join(roles)})",
                        "permission_error", code="forbidden")
    if limited:
        why = st.limiter.check(key)
        if why:
            st.metrics.rejected.labels("rate_limit").inc()
            return ApiError(429, why, "rate_limit_error", code="rate_limit_exceeded",
                            headers={"Retry-After": str(st.limiter.retry_after(key))})
    return None


# --------------------------------------------------------------------------- tokens


def reserve(st: ServerState, info: dict, tokens: int, param: str = "max_tokens") -> int | None:
    """Reserve ``tokens`` of the caller's tokens-per-minute budget; a ticket for ``settle`` (None: no key)."""
    key = info.get("api_key")
    if key is None or key.tokens_per_minute is None:
        return None
    if tokens > key.tokens_per_minute:
        raise ApiError(400, f"this request may use up to {tokens} tokens, more than the key's limit of "
                            f"{key.tokens_per_minute} tokens per minute; lower max_tokens, n or the prompt",
                       param=param, code="request_too_large")
    ticket, why = st.limiter.reserve(key, tokens)
    if why:
        st.metrics.rejected.labels("rate_limit").inc()
        raise ApiError(429, why, "rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(st.limiter.retry_after(key, tokens))})
    return ticket


def settle(st: ServerState, info: dict, ticket: int | None, tokens: int) -> None:
    key = info.get("api_key")
    if key is not None:
        st.limiter.settle(key.id, ticket, tokens)


def accountant(st: ServerState, info: dict, route: str, ticket: int | None):
    """The ledger's completion: settle the rate limit, count tokens and time to first token."""
    key = info.get("api_key")

    def account(ledger: Ledger) -> None:
        st.open_ledgers.discard(ledger)
        if key is not None:
            st.limiter.settle(key.id, ticket, ledger.total_tokens)
        st.metrics.prompt_tokens.inc(ledger.prompt_tokens)
        st.metrics.completion_tokens.inc(ledger.completion_tokens)
        for t in ledger.ttft:
            st.metrics.ttft.labels(route).observe(t)

    return account


# --------------------------------------------------------------------------- generations


async def start_generation(st: ServerState, info: dict, body, route: str) -> tuple[Generation, str, int]:
    """Check, prepare, reserve and start ``body`` (a completion or chat request): (generation, model id, choices).

    The accounting (limits, token counters, TTFT, the audit line) hangs on the generation's
    ledger, which completes at every exit: finish, error, client gone, shutdown. A request
    refused before it ran (queue full, every upstream down) gives its reservation back.
    """
    d = st.driver
    name = d.check(body.model)
    info["model"] = name
    bad = body.unsupported()
    if bad:
        raise ApiError(400, bad[1], param=bad[0], code="unsupported_parameter")
    if st.cfg.ab.candidate:  # the A/B split by key needs the caller
        from homeforge.serve.ab import CALLER

        CALLER.set(info.get("key_id"))
    job = d.prepare(body)
    ticket = reserve(st, info, job.budget)
    ledger = Ledger(job.choices, job.prompt_tokens, keep_text=st.cfg.audit_text or st.feedback is not None)
    st.open_ledgers.add(ledger)  # before the start: the producer may finish before `start` returns
    ledger.when_done(accountant(st, info, route, ticket))
    try:
        gen = d.start(job, ledger)
        await gen.opened()
    except BaseException:  # nothing ran (queue full, shutting down, refused upstream): the reservation goes back
        st.open_ledgers.discard(ledger)
        settle(st, info, ticket, 0)
        raise
    info["ledger"] = ledger
    if st.cfg.audit_text:
        info["prompt_text"] = job.audit_prompt
    return gen, name, job.choices


def release(gen: Generation) -> None:
    """The consumer is leaving: stop the producer; close the ledger later if it never reports."""
    gen.cancel()
    if not gen.ledger.done:
        asyncio.get_running_loop().call_later(LEDGER_GRACE_S, gen.ledger.close)


# --------------------------------------------------------------------------- metrics and audit


def record(st: ServerState, info: dict, route: str, method: str | None, status: int, seconds: float,
           client: str | None, **extra) -> None:
    """Count and time one call, and write its audit line (for a generation: once its ledger is complete)."""
    role = info.get("role", "none")
    m = st.metrics
    m.requests.labels(route, str(status), role).inc()
    m.latency.labels(route).observe(seconds)
    if st.audit is None or route in QUIET:
        return
    rec = {"event": "serve.request", "route": route, "method": method, "status": status,
           "latency_ms": round(seconds * 1000, 2), "key_id": info.get("key_id"), "role": role,
           "model": info.get("model"), "prompt_tokens": info.get("prompt_tokens"),
           "completion_tokens": info.get("completion_tokens"), "client": client, **extra}
    if "prompt_text" in info:
        rec["prompt"] = info["prompt_text"]
    ledger = info.get("ledger")
    if ledger is None:
        _write(st, rec)
        return

    def write(ledger: Ledger) -> None:  # once every choice has finished: at once, or later from the producer
        full = {**rec, **ledger.audit_fields()}
        if "prompt" in rec:
            full["completion"] = "\n".join(ledger.texts or [])
        _write(st, full)

    ledger.when_done(write)


def _write(st: ServerState, rec: dict) -> None:
    st.audit.append(rec)
    st.metrics.audit_errors.set(st.audit.errors)


# --------------------------------------------------------------------------- embeddings and classifications


async def embed(st: ServerState, info: dict, body) -> dict:
    """The /v1/embeddings response for ``body``; charged after it ran (the next request over the budget is refused)."""
    d = st.driver
    name = info["model"] = d.check(body.model)
    data, n = await d.embed(body)
    settle(st, info, None, n)
    info["prompt_tokens"], info["completion_tokens"] = n, 0
    st.metrics.prompt_tokens.inc(n)
    return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": n, "total_tokens": n}}


async def classify(st: ServerState, info: dict, body) -> dict:
    """The /v1/classifications response for ``body``; charged after it ran."""
    d = st.driver
    name = info["model"] = d.check(body.model, "classifier")
    data, n = await d.classify(body)
    settle(st, info, None, n)
    info["prompt_tokens"] = n
    st.metrics.prompt_tokens.inc(n)
    return {"object": "list", "model": name, "data": data, "usage": {"prompt_tokens": n, "total_tokens": n}}

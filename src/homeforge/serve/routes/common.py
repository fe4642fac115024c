"""What every router shares: the server state of a request, token charging, documented errors."""

from __future__ import annotations

from fastapi import Request

from homeforge.serve.errors import ApiError
from homeforge.serve.protocol import ErrorResponse
from homeforge.serve.state import ServerState


def server(request: Request) -> ServerState:
    return request.app.state.server


def driver(request: Request):
    return request.app.state.server.driver


def errors(*codes: int) -> dict:
    """OpenAPI ``responses`` for the error statuses a route can answer (all in the OpenAI shape)."""
    return {c: {"model": ErrorResponse, "description": DESCRIPTIONS[c]} for c in codes}


DESCRIPTIONS = {
    400: "invalid request (the error names the field)", 401: "missing or invalid API key",
    403: "the key's role may not use this route", 404: "unknown model or route",
    413: "request body or prompt too large", 429: "rate limit or queue full (see Retry-After)",
    500: "generation failed", 503: "model loading or server shutting down",
}
COMMON = (401, 403, 413)


def reserve(request: Request, tokens: int, param: str = "max_tokens") -> int | None:
    """Reserve ``tokens`` of the caller's tokens-per-minute budget; a ticket for ``settle`` (None: no key)."""
    key = getattr(request.state, "api_key", None)
    if key is None or key.tokens_per_minute is None:
        return None
    st = server(request)
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


def settle(request: Request, ticket: int | None, tokens: int) -> None:
    key = getattr(request.state, "api_key", None)
    if key is not None:
        server(request).limiter.settle(key.id, ticket, tokens)

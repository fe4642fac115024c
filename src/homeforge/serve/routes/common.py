"""What every router shares: the server state of a request, documented errors (token charging: ``calls``)."""

from __future__ import annotations

from fastapi import Request

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
    500: "generation failed", 502: "gateway mode: no upstream server could answer",
    503: "model loading, server shutting down, or (gateway) no healthy upstream",
}
COMMON = (401, 403, 413)

"""Errors in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` and their handlers.

Every refusal names the field (``param``, a path such as ``messages[0].content``), the
value given and what is accepted; no request gets a FastAPI-style 422 or a traceback.
"""

from __future__ import annotations

import json
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

BAD_REQUEST = "invalid_request_error"

# what a field accepts, for values that match none of the members of its union type
FIELD_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "input": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "content": 'a string or a list of text parts ({"type": "text", "text": "..."}); this model reads text only',
    "stop": "a non-empty string or a list of up to 16 non-empty strings",
    "tool_choice": "'none', 'auto', 'required' or an object",
}
_TAG = re.compile(r"^([a-z]+(-[a-z]+)*(\[.*\])?|[A-Z]\w*(\[.*\])?)$")
_PLAIN_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = BAD_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status, message, type_, param, code, headers)

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_bytes(message: str, type_: str = BAD_REQUEST, code: str | None = None) -> bytes:
    return json.dumps(error_body(message, type_, None, code)).encode()


# --------------------------------------------------------------------------- validation messages


def _is_tag(item) -> bool:
    """A pydantic union-member label in an error location ('str', 'list[TextPart]', 'constrained-int')."""
    if not isinstance(item, str) or (_PLAIN_FIELD.match(item) and item not in ("str", "int", "float", "bool",
                                                                                "none", "dict", "list")):
        return False
    return bool(_TAG.match(item))


def _path(loc) -> str:
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def _given(value) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic errors of a request body: one clause per field, at most five."""
    found = []  # (location, error)
    for e in errors:
        loc = list(e.get("loc", ()))
        loc = loc[1:] if loc[:1] == ["body"] else loc
        if e.get("type") == "json_invalid" or (not loc and e.get("type") in ("model_attributes_type", "dict_type",
                                                                             "model_type")):
            return ("the request body must be a JSON object (check the JSON syntax and the "
                    "Content-Type: application/json header)"), None
        if not loc and e.get("type") == "missing":
            return "the request body is empty: send a JSON object with the request's fields " \
                   "(GET /openapi.json lists them)", None
        found.append((tuple(loc), e))
    # a value that matches no member of a union is one clause (at the union); errors inside the one
    # member that applies (e.g. the message type its role selects) are clauses of their own
    members: dict[tuple, set] = {}
    for loc, _ in found:
        for i, x in enumerate(loc):
            if _is_tag(x):
                members.setdefault(loc[:i], set()).add(x)
    groups: dict[tuple, list[tuple[tuple, dict]]] = {}
    for loc, e in found:
        union = next((loc[:i] for i, x in enumerate(loc) if _is_tag(x) and len(members[loc[:i]]) > 1), loc)
        clean = tuple(x for x in loc if not _is_tag(x))
        groups.setdefault(tuple(x for x in union if not _is_tag(x)), []).append((clean, e))
    parts, param = [], None
    for key, errs in list(groups.items())[:5]:
        name = _path(key) or "body"
        param = param or name
        loc, e = errs[0]
        field = next((x for x in reversed(key) if isinstance(x, str)), "")
        if len(errs) > 1:
            given = next((x.get("input") for lc, x in errs if lc == key), e.get("input"))
            what = FIELD_HINTS.get(field)
            parts.append(f"{name} must be {what} (given {_given(given)})" if what
                         else f"{name}: {_given(given)} is not an accepted value")
        elif e.get("type") == "missing":
            parts.append(f"{name} is required")
        else:
            msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
            parts.append(f"{name}: {msg} (given {_given(e.get('input'))})")
    return "; ".join(parts) or "invalid request", param


# --------------------------------------------------------------------------- handlers


def install_handlers(app: FastAPI) -> None:
    """Every error leaves the app in the OpenAI shape: ours, validation, unknown routes, crashes."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_error(list(exc.errors()))
        return JSONResponse(error_body(message, BAD_REQUEST, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else BAD_REQUEST
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

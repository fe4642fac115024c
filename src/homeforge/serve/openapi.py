"""``GET /openapi.json``: the document of what this server accepts, generated from the schemas.

FastAPI's generator plus three corrections so the document matches the server: errors are
400s in the OpenAI shape (no 422 validation responses), every error status a route can
answer is listed, and the bearer key is required exactly when the server requires keys.
"""

from __future__ import annotations

import copy

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from homeforge.serve.middleware import ACCESS

DESCRIPTION = ("OpenAI-compatible API of `homeforge serve`. Requests are validated strictly (no bool or float "
               "where an integer is expected); errors use the OpenAI shape with `param` naming the field.")


def build(app: FastAPI) -> dict:
    from homeforge import __version__

    doc = get_openapi(title="homeforge serve", version=__version__, description=DESCRIPTION, routes=app.routes)
    for item in doc.get("paths", {}).values():
        for op in item.values():
            op.get("responses", {}).pop("422", None)
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    doc.setdefault("components", {})["securitySchemes"] = {
        "bearerAuth": {"type": "http", "scheme": "bearer",
                       "description": "an API key from `homeforge keys add` (when the server requires keys)"}}
    return doc


def document(app: FastAPI, keys_required: bool) -> dict:
    """The cached document, with security set for the server's current key policy."""
    base = getattr(app.state, "openapi_doc", None)
    if base is None:
        base = app.state.openapi_doc = build(app)
    doc = copy.deepcopy(base)
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            if path in ACCESS:
                op["security"] = [{"bearerAuth": []}] if keys_required else []
    return doc

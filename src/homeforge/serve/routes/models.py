"""/v1/models (what this server serves) and /admin/reload (re-read the model from disk)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from homeforge.serve.protocol import ModelList
from homeforge.serve.routes.common import COMMON, driver, errors

router = APIRouter()


@router.get("/v1/models", summary="the served model", responses={200: {"model": ModelList}, **errors(*COMMON, 429)})
async def models(request: Request):
    return {"object": "list", "data": driver(request).models()}


@router.post("/admin/reload", summary="reload the model from disk, between two sequences (role admin)",
             responses=errors(*COMMON, 400, 503))
async def reload(request: Request):
    d = driver(request)
    await d.reload()
    return {"status": "reloaded", "model": d.name}

"""/v1/classifications (classifier models): label, score and every label's probability per text."""

from __future__ import annotations

from fastapi import APIRouter, Request

from homeforge.serve import calls
from homeforge.serve.protocol import ClassificationRequest, ClassificationResponse
from homeforge.serve.routes.common import COMMON, errors, server

router = APIRouter()


@router.post("/v1/classifications", summary="classify texts",
             responses={200: {"model": ClassificationResponse}, **errors(*COMMON, 400, 404, 429, 502, 503)})
async def classifications(request: Request, body: ClassificationRequest):
    return await calls.classify(server(request), request.scope.setdefault("state", {}), body)

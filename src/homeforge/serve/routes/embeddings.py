"""/v1/embeddings: mean-pooled, L2-normalised last hidden states (float or base64)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from homeforge.serve import calls
from homeforge.serve.protocol import EmbeddingRequest, EmbeddingResponse
from homeforge.serve.routes.common import COMMON, errors, server

router = APIRouter()


@router.post("/v1/embeddings", summary="embed texts or token ids",
             responses={200: {"model": EmbeddingResponse}, **errors(*COMMON, 400, 404, 429, 502, 503)})
async def embeddings(request: Request, body: EmbeddingRequest):
    return await calls.embed(server(request), request.scope.setdefault("state", {}), body)

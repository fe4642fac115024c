"""/v1/embeddings: mean-pooled, L2-normalised last hidden states (float or base64)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from homeforge.serve.protocol import EmbeddingRequest, EmbeddingResponse
from homeforge.serve.routes.common import COMMON, driver, errors, server, settle

router = APIRouter()


@router.post("/v1/embeddings", summary="embed texts or token ids",
             responses={200: {"model": EmbeddingResponse}, **errors(*COMMON, 400, 404, 429, 503)})
async def embeddings(request: Request, body: EmbeddingRequest):
    st, d = server(request), driver(request)
    d.check(body.model)
    request.state.model = d.name
    data, n = await d.embed(body)
    settle(request, None, n)  # charged after: the next request over the budget is refused
    request.state.prompt_tokens, request.state.completion_tokens = n, 0
    st.metrics.prompt_tokens.inc(n)
    return {"object": "list", "data": data, "model": d.name, "usage": {"prompt_tokens": n, "total_tokens": n}}

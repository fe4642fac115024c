"""/v1/classifications (classifier models): label, score and every label's probability per text."""

from __future__ import annotations

from fastapi import APIRouter, Request

from homeforge.serve.protocol import ClassificationRequest, ClassificationResponse
from homeforge.serve.routes.common import COMMON, driver, errors, server, settle

router = APIRouter()


@router.post("/v1/classifications", summary="classify texts",
             responses={200: {"model": ClassificationResponse}, **errors(*COMMON, 400, 404, 429, 503)})
async def classifications(request: Request, body: ClassificationRequest):
    st, d = server(request), driver(request)
    d.check(body.model, "classifier")
    request.state.model = d.name
    texts = [body.input] if isinstance(body.input, str) else body.input
    data, n = await d.classify(texts)
    settle(request, None, n)  # charged after: the next request over the budget is refused
    request.state.prompt_tokens = n
    st.metrics.prompt_tokens.inc(n)
    return {"object": "list", "model": d.name, "data": data, "usage": {"prompt_tokens": n, "total_tokens": n}}

"""/v1/classifications (classifier models): label, score and every label's probability per text."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from homeforge.serve import calls
from homeforge.serve.protocol import ClassificationRequest, ClassificationResponse
from homeforge.serve.routes.common import COMMON, errors, server

router = APIRouter()


@router.post("/v1/classifications", summary="classify texts",
             responses={200: {"model": ClassificationResponse}, **errors(*COMMON, 400, 404, 429, 502, 503)})
async def classifications(request: Request, body: ClassificationRequest):
    st = server(request)
    started = time.perf_counter()
    res = await calls.classify(st, request.scope.setdefault("state", {}), body)
    if st.feedback is not None:  # one exchange per text; the response's id is what feedback refers to
        res["id"] = f"clf-{uuid.uuid4().hex}"
        st.remember(res["id"], None)
        texts = [body.input] if isinstance(body.input, str) else body.input
        ms = round((time.perf_counter() - started) * 1000, 2)
        for text, item in zip(texts, res["data"], strict=False):
            st.feedback.append({"type": "exchange", "id": f"{res['id']}-{item['index']}", "request": res["id"],
                                "route": "/v1/classifications", "model": res["model"], "prompt": text,
                                "label": item["label"], "scores": item.get("scores"), "latency_ms": ms})
    return res

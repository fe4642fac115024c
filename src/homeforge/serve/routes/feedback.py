"""POST /v1/feedback: a rating and/or a correction for an earlier response (feedback.enabled)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from homeforge.serve.errors import ApiError
from homeforge.serve.routes.common import COMMON, errors, server

router = APIRouter()


class FeedbackRequest(BaseModel):
    id: str = Field(description="the `id` of the response the feedback is about (chatcmpl-..., cmpl-...)")
    rating: float | None = Field(None, ge=-1000, le=1000, description="a score, e.g. 1-5 or -1/+1 (higher is better)")
    correction: str | None = Field(None, max_length=200_000, description="what the answer should have been")
    comment: str | None = Field(None, max_length=20_000, description="free text")


class FeedbackResponse(BaseModel):
    object: str = "feedback"
    id: str
    arm: str | None = None


@router.post("/v1/feedback", summary="rate or correct an earlier response (when feedback capture is on)",
             responses={200: {"model": FeedbackResponse}, **errors(*COMMON, 400, 404)})
async def feedback(request: Request, body: FeedbackRequest):
    st = server(request)
    if st.feedback is None:
        raise ApiError(404, "feedback capture is off on this server (start it with feedback.enabled=true)",
                       "invalid_request_error", code="feedback_disabled")
    if body.rating is None and not body.correction and not body.comment:
        raise ApiError(400, "feedback needs a rating, a correction or a comment", param="rating")
    if body.id not in st.responses:
        raise ApiError(404, f"no recent response has id {body.id!r} (only the last {st.cfg.feedback.remember} "
                       "responses of this server can get feedback)", "invalid_request_error", param="id",
                       code="unknown_response")
    arm = st.responses[body.id]
    st.feedback.append({"type": "feedback", "id": body.id, "arm": arm, "rating": body.rating,
                        "correction": body.correction, "comment": body.comment, "time": time.time()})
    info = request.scope.setdefault("state", {})
    info["model"] = arm
    return {"object": "feedback", "id": body.id, "arm": arm}


def capture(st, request_body, shape, gen, started: float, arm: str | None) -> None:
    """Record the exchange once the generation is complete (from the ledger's completion)."""
    if st.feedback is None:
        return
    st.remember(shape.id, arm)
    chat = hasattr(request_body, "messages")
    base = {"type": "exchange", "id": shape.id, "arm": arm, "model": shape.name, "version": shape.fingerprint,
            "route": shape.route}
    if chat:
        base["messages"] = [m.for_template() for m in request_body.messages]
    else:
        base["prompt"] = request_body.prompt if isinstance(request_body.prompt, str) else str(request_body.prompt)

    def write(ledger) -> None:
        st.feedback.append({**base, "response": "\n".join(ledger.texts or []),
                            "finish_reason": next((r for r in ledger.reasons if r), None),
                            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                            "ttft_ms": round(ledger.ttft[0] * 1000, 2) if ledger.ttft else None,
                            "prompt_tokens": ledger.prompt_tokens, "completion_tokens": ledger.completion_tokens})

    gen.ledger.when_done(write)

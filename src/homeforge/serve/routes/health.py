"""/health (liveness), /ready (model loaded), /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from homeforge.serve.errors import error_body
from homeforge.serve.routes.common import errors, server

router = APIRouter()


@router.get("/health", summary="liveness: the process answers")
async def health():
    return {"status": "ok"}


@router.get("/ready", summary="readiness: the model is loaded", responses=errors(503))
async def ready(request: Request):
    st = server(request)
    if st.ready:
        return {"status": "ready", "model": st.name, "kind": st.kind}
    body = error_body(f"the model failed to load: {st.load_error}" if st.load_error else "loading",
                      "service_unavailable", code="not_ready")
    return JSONResponse(body, status_code=503)


@router.get("/metrics", summary="Prometheus metrics (roles admin, metrics)", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **errors(401, 403)})
async def metrics(request: Request):
    return Response(server(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

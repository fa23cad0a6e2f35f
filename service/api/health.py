"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.context import ServiceContext, get_ctx

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/livez", summary="Liveness: the process answers")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.head("/livez", include_in_schema=False)
async def livez_head() -> Response:
    """HEAD /livez (load balancers and uptime checks probe with HEAD): 200, no body."""
    return Response(status_code=200)


@router.get(
    "/readyz",
    summary="Readiness: model loaded, warmed up, not draining",
    responses={503: {"description": "not ready (starting or draining)"}},
)
async def readyz(ctx: ServiceContext = Depends(get_ctx)) -> JSONResponse:
    body: dict[str, Any] = {
        "ready": ctx.ready,
        "model_loaded": ctx.loaded,
        "warmed_up": ctx.warmed,
        "draining": ctx.draining,
        "queue_depth": ctx.batcher.queued_images,
        "in_flight": ctx.in_flight,
        "device": str(ctx.device),
    }
    return JSONResponse(body, status_code=200 if ctx.ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
)
async def metrics(ctx: ServiceContext = Depends(get_ctx)) -> Response:
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

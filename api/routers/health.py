"""Liveness, readiness and Prometheus metrics. The probes are always open; /metrics needs the API key
(when one is set) unless the settings make it public."""

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import MetricsDep
from ..errors import APIError, worker_dead
from ..schemas import ErrorResponse, Status

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Status,
    summary="Liveness: the process answers and its model worker lives",
    responses={503: {"model": ErrorResponse, "description": "the model worker has died: restart me"}},
)
async def healthz(request: Request):
    batcher = getattr(request.app.state, "batcher", None)
    if batcher is not None and batcher.dead:
        return worker_dead().response()
    return Status(status="ok")


@router.get(
    "/readyz",
    response_model=Status,
    summary="Readiness: the model is loaded and its worker runs",
    responses={503: {"model": ErrorResponse, "description": "not ready"}},
)
async def readyz(request: Request):
    batcher = getattr(request.app.state, "batcher", None)
    if batcher is None or not batcher.alive:
        return APIError(503, "not_ready", "the model is not loaded, or the server is stopping").response()
    return Status(status="ready")


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text exposition format"}},
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

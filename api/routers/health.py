"""Liveness, readiness and Prometheus metrics. The probes are always open; /metrics needs the API key
(when one is set) unless the settings make it public."""

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import MetricsDep
from ..errors import APIError, worker_dead
from ..schemas import ErrorResponse, Health, Status

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Health,
    response_model_exclude_none=True,
    summary="Liveness: the process answers, and how many of its model workers run",
    responses={
        503: {
            "model": ErrorResponse,
            "description": "the model workers died beyond max_worker_restarts: the server is exiting",
        }
    },
)
async def healthz(request: Request):
    """A dead worker is replaced, and fails nothing here: only a server that has given up on its
    workers (and is exiting) fails liveness."""
    batcher = getattr(request.app.state, "batcher", None)
    if batcher is None:
        return Health(status="ok")
    if batcher.dead:
        return worker_dead().response()
    return Health(status="ok", workers=len(batcher.workers), workers_alive=batcher.workers_alive)


@router.get(
    "/readyz",
    response_model=Status,
    summary="Readiness: the model is loaded and a worker runs",
    responses={503: {"model": ErrorResponse, "description": "not ready"}},
)
async def readyz(request: Request):
    batcher = getattr(request.app.state, "batcher", None)
    if batcher is None or not batcher.alive:
        return APIError(
            503, "not_ready", "the model is not loaded, no model worker runs, or the server is stopping"
        ).response()
    return Status(status="ready")


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text exposition format"}},
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

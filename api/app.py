"""The FastAPI app: `create_app(settings)` builds it; its lifespan loads the model.

uvicorn --factory api.app:create_app      # settings from CAPTIONER_* variables
captioner serve --checkpoint model.safetensors
"""

import logging
import os
import signal
import sys
from contextlib import asynccontextmanager
from typing import NoReturn

import anyio
import torch
from fastapi import FastAPI, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles

from captioner.predictor import Predictor
from runtime.children import RestartBudget

from .admission import Admission
from .batcher import Batcher
from .errors import install_error_handlers
from .form import request_body_schema
from .guard import RequestGuard
from .headers import SecurityHeaders
from .metrics import Metrics, MetricsMiddleware
from .routers import captions, health, model, page
from .routers.model import describe_model
from .schemas import ModelSummary
from .settings import Settings, get_settings
from .workers import ProcessWorker, ThreadWorker, load_predictor, uses_processes

log = logging.getLogger("captioner.api")

GAVE_UP_STATUS = 1  # the exit status of a server whose model workers died beyond the restart budget
UNSERVABLE_STATUS = 2  # ... of one whose checkpoint cannot be served (a usage error, as the command's others)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    # Loaded here, and the worker processes forked (each from a thread of its own: api.workers)
    # before the server serves. With them, the server itself computes nothing: one torch thread.
    torch.set_num_threads(1 if uses_processes(settings) else settings.threads)
    try:
        predictor = load_predictor(settings)
    except ValueError as e:  # a checkpoint or ONNX encoder that cannot be served: said in one line
        _exit_failed(f"cannot serve {settings.checkpoint}: {e}", UNSERVABLE_STATUS)
    workers = start_workers(settings, predictor)
    batcher = Batcher(
        workers,
        app.state.metrics,
        settings.max_batch_size,
        settings.max_wait_ms,
        settings.queue_size,
        settings.busy_wait_ms,
        on_batch=app.state.admission.record,
        restarts=RestartBudget(settings.max_worker_restarts, settings.restart_window_s),
        on_give_up=_shut_down,
    )
    app.state.predictor, app.state.batcher = predictor, batcher
    summary = ModelSummary.model_validate(describe_model(predictor, settings))
    app.state.model_json = summary.model_dump_json().encode()  # every answer begins with it
    try:
        batcher.start()
        log.info(
            "serving %s (encoder %s on %s) on %s with %d model worker %s",
            settings.checkpoint,
            predictor.model.config.encoder,
            "{backend}, {precision}".format(**predictor.runtime),
            settings.device,
            len(workers),
            "processes" if uses_processes(settings) else "thread",
        )
        yield
    finally:
        await anyio.to_thread.run_sync(batcher.stop)
        log.info("model workers stopped")
        if batcher.gave_up is not None:
            _exit_failed(batcher.gave_up)


def _shut_down(why: str) -> None:
    """The batcher gave up: the server shuts down as on SIGTERM (uvicorn's handler), answering
    what it holds, and the lifespan's end exits with GAVE_UP_STATUS."""
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_failed(why: str, status: int = GAVE_UP_STATUS) -> NoReturn:
    """uvicorn ends a shutdown with status 0, or by raising SIGTERM again, which systemd counts as
    a clean stop, and a failed start-up with a traceback: neither tells a supervisor, or a user,
    what happened. So it exits here, once its requests are answered and its workers stopped."""
    log.critical("exiting with status %d: %s", status, why)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def start_workers(settings: Settings, predictor: Predictor) -> list[ProcessWorker] | list[ThreadWorker]:
    if not uses_processes(settings):
        return [ThreadWorker(predictor)]
    threads = max(1, settings.threads // settings.workers)
    workers = [ProcessWorker(predictor, i, threads, settings.threads) for i in range(settings.workers)]
    for worker in workers:
        worker.start()
    return workers


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="captioner",
        summary="Image captioning with an attention LSTM decoder: n-best captions and where each word looked.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.admission = admission = Admission(settings.queue_size)
    app.state.metrics.in_flight.set_function(lambda: admission.in_flight)
    install_error_handlers(app)

    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    # The guard does the checking; this only documents the header in /docs.
    documented = [Security(APIKeyHeader(name="X-API-Key", auto_error=False))] if api_key else []
    app.include_router(captions.router, dependencies=documented)
    _document_caption_form(app, settings.max_images)
    app.include_router(model.router, dependencies=documented)
    app.include_router(health.router)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")

    # Added innermost first: metrics see every answer, every answer gets the security headers, CORS
    # answers preflights before the key check.
    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_body_bytes,
        api_key=api_key,
        public_metrics=settings.public_metrics,
        body_timeout=settings.body_timeout_s,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type"],
        )
    app.add_middleware(SecurityHeaders)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


def _document_caption_form(app: FastAPI, max_images: int) -> None:
    """The caption form is parsed by api.form, not by FastAPI: its schema comes from there too."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()  # cached by FastAPI in app.openapi_schema
            schema["paths"]["/v1/captions"]["post"]["requestBody"] = request_body_schema(max_images)
            return schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

"""What routes depend on, named once: the settings, the predictor, the batcher, the metrics, the
admission count, a caption request's form.

Each is `async def`, though none awaits: FastAPI runs a plain `def` dependency in its thread pool,
a hand-over to another thread and back for every request."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from captioner.predictor import Predictor

from .admission import Admission, Ticket
from .batcher import Batcher
from .errors import worker_dead
from .form import CaptionForm, read_caption_form
from .metrics import Metrics
from .settings import Settings


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _predictor(request: Request) -> Predictor:
    return request.app.state.predictor


async def _batcher(request: Request) -> Batcher:
    return request.app.state.batcher


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def _admission(request: Request) -> Admission:
    return request.app.state.admission


async def _caption_form(request: Request) -> AsyncIterator[CaptionForm]:
    """The files and options of a caption request, read within the limits, each image admitted as
    its part begins; the images let go and the files closed once the request is answered."""
    settings: Settings = request.app.state.settings
    predictor: Predictor = request.app.state.predictor
    batcher: Batcher = request.app.state.batcher
    admission: Admission = request.app.state.admission
    if batcher.dead:  # refused before a byte of the body is read
        raise worker_dead()
    if admission.full:
        raise admission.overloaded()
    ticket = Ticket(admission)
    try:
        form = await read_caption_form(
            request, settings.max_images, predictor.limits.max_bytes, on_image=ticket.admit_image
        )
        try:
            yield form
        finally:
            form.close()
    finally:
        ticket.release()


SettingsDep = Annotated[Settings, Depends(_settings)]
PredictorDep = Annotated[Predictor, Depends(_predictor)]
BatcherDep = Annotated[Batcher, Depends(_batcher)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
AdmissionDep = Annotated[Admission, Depends(_admission)]
CaptionFormDep = Annotated[CaptionForm, Depends(_caption_form)]

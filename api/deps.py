"""What routes depend on, named once: the settings, the predictor, the batcher, the threads that
decode images, the metrics."""

from typing import Annotated

import anyio
from fastapi import Depends, Request

from captioner.predictor import Predictor

from .batcher import Batcher
from .metrics import Metrics
from .settings import Settings


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _predictor(request: Request) -> Predictor:
    return request.app.state.predictor


def _batcher(request: Request) -> Batcher:
    return request.app.state.batcher


def _image_threads(request: Request) -> anyio.CapacityLimiter:
    return request.app.state.image_threads


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(_settings)]
PredictorDep = Annotated[Predictor, Depends(_predictor)]
BatcherDep = Annotated[Batcher, Depends(_batcher)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
ImageThreadsDep = Annotated[anyio.CapacityLimiter, Depends(_image_threads)]

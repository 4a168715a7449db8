"""The model card: what is loaded, what it was trained on, how it scored, and the limits."""

import re

from fastapi import APIRouter

from captioner.decoding import MAX_BEAM_SIZE, MAX_CAPTIONS, MAX_LENGTH, MAX_TOP_K
from captioner.predictor import Predictor
from captioner.vocab import SPECIALS

from ..deps import PredictorDep, SettingsDep
from ..schemas import ERROR_RESPONSES, Limits, ModelCard
from ..settings import Settings

router = APIRouter(prefix="/v1", tags=["model"])


@router.get(
    "/model", response_model=ModelCard, summary="The loaded model's card", responses={401: ERROR_RESPONSES[401]}
)
async def model_card(predictor: PredictorDep, settings: SettingsDep) -> ModelCard:
    limits = Limits(
        max_beam_size=MAX_BEAM_SIZE,
        max_captions=MAX_CAPTIONS,
        max_length=MAX_LENGTH,
        max_top_k=MAX_TOP_K,
        max_images=settings.max_images,
        max_bytes=predictor.limits.max_bytes,
        max_pixels=predictor.limits.max_pixels,
        max_decode_bytes=settings.max_decode_bytes,
        max_response_bytes=settings.max_response_bytes,
        formats=list(predictor.limits.formats),
    )
    words = [w for w in predictor.model.vocab.words if w not in SPECIALS]
    return ModelCard(**{**describe_model(predictor, settings), "vocabulary": words, "limits": limits})


def describe_model(predictor: Predictor, settings: Settings) -> dict:
    """The predictor's own description and saved card, with the checkpoint's file name. Absolute
    paths of the machine that trained it (the data's root, the run's folders) are cut to their
    base names: where someone keeps their data is no business of the server's clients."""
    return {**without_paths(predictor.info()), "checkpoint": settings.checkpoint.name}


# An absolute path, POSIX (/data/coco, ~/coco) or Windows (C:\data, \\server\share), alone or in a
# sentence; not the path of a URL (after "//host") nor a fraction like 1/2 or "val/test".
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/\\~-])(?:~|[A-Za-z]:|\\)?[/\\](?:[^\s/\\'\"]+[/\\])*([^\s/\\'\"]*)")


def without_paths(value):
    """`value` (JSON-like) with every absolute path replaced by its base name."""
    if isinstance(value, str):
        return ABSOLUTE_PATH.sub(r"\1", value)
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_paths(v) for v in value]
    return value

"""POST /v1/captions: images in, n-best captions out, with attention grids or heatmaps on request.

The four phases: read each upload up to its byte limit; decode and preprocess
in worker threads (never on the event loop); caption on the model worker,
batched with other requests; render heatmap overlays, if asked, in a thread.
"""

import asyncio
import base64
import io
from collections.abc import Awaitable

import anyio
from fastapi import APIRouter, Request, Response
from PIL import Image
from pydantic import TypeAdapter
from starlette.datastructures import UploadFile

from captioner.decoding import distinct_captions
from captioner.images import ImageError
from captioner.overlay import drop_attention, heatmap_overlay, prepare_with_picture
from captioner.predictor import Predictor, PreparedImage
from captioner.vocab import SPECIALS

from ..batcher import QueueFull, ShuttingDown, WorkerDead
from ..deps import AdmissionDep, BatcherDep, CaptionFormDep, ImageThreadsDep, PredictorDep, SettingsDep
from ..errors import APIError, ClientGone, invalid_option, worker_dead
from ..schemas import ERROR_RESPONSES, CaptionOptions, CaptionResponse
from ..settings import Settings
from .model import describe_model

router = APIRouter(prefix="/v1", tags=["captions"])
RESPONSE = TypeAdapter(CaptionResponse)

RETRY_AFTER = {"Retry-After": "1"}  # a stopping server: its replacement is moments away


@router.post(
    "/captions",
    response_model=CaptionResponse,
    response_model_exclude_none=True,
    summary="Caption one or more images",
    responses=ERROR_RESPONSES,
)
async def create_captions(
    request: Request,
    form: CaptionFormDep,
    admission: AdmissionDep,
    predictor: PredictorDep,
    batcher: BatcherDep,
    settings: SettingsDep,
    image_threads: ImageThreadsDep,
) -> Response:
    """Send the images as files of the multipart field `images`, and the options as fields
    beside them. Results come in upload order, each named by its file. Any unusable file fails
    the whole request with the error naming that file; an unknown field is an error too."""
    options = form.options
    _check_num_captions(options, predictor)
    _check_response_size(options, len(form.images), predictor, settings)
    decode_options = options.decode_options()
    names = form.names
    overlay_size = settings.overlay_size if options.overlays else None
    prepared, pictures = await anyio.to_thread.run_sync(
        _prepare, predictor, names, form.images, overlay_size, limiter=image_threads
    )

    try:
        results = await _unless_gone(request, batcher.submit(prepared, decode_options), settings.request_timeout_s)
    except QueueFull:
        raise admission.overloaded() from None
    except ShuttingDown:
        raise APIError(503, "shutting_down", "the server is stopping", RETRY_AFTER) from None
    except WorkerDead:
        raise worker_dead() from None
    except asyncio.TimeoutError:
        raise APIError(504, "timeout", f"the model did not answer within {settings.request_timeout_s:g} s") from None

    if options.overlays:
        await anyio.to_thread.run_sync(_add_overlays, results, pictures, limiter=image_threads)
    for name, result in zip(names, results):
        result["file"] = name
        if not options.attention:
            drop_attention(result)
    answer = {"model": describe_model(predictor, settings), "results": results}
    # Validating and encoding megabytes of JSON takes a while: in a thread, never on the event loop
    return Response(
        await anyio.to_thread.run_sync(_encode, answer, limiter=image_threads), media_type="application/json"
    )


async def _unless_gone(request: Request, answer: Awaitable[list[dict]], timeout: float) -> list[dict]:
    """`answer`, unless the client disconnects first (ClientGone) or it takes over `timeout`
    (asyncio.TimeoutError). Either way the job is cancelled, and the model worker skips it."""
    job = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({job, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.done():
            job.cancel()  # cancels the job's future: the worker sees it done and passes it by
    if job in done:
        return job.result()
    if gone in done:
        raise ClientGone()
    raise asyncio.TimeoutError()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone. The body is read by now: the next message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# The most JSON each part of an answer takes (upper bounds: the estimate must never be exceeded)
IMAGE_BYTES = 512  # a result's file name, size, method and grid, and the model summary's share
CAPTION_BYTES = 96  # a caption's keys and its log_prob
WORD_BYTES = 48  # a word twice (text and tokens) with its quotes and separators
GRID_CELL_BYTES = 10  # an attention weight, as 0.01303 or 1e-05, and its separator


def response_bytes(options: CaptionOptions, images: int, grid_cells: int, overlay_size: int) -> int:
    """The most bytes the answer to these options and images can take: every caption max_length words."""
    captions = 1 if options.method == "greedy" else options.num_captions
    word = WORD_BYTES + (grid_cells * GRID_CELL_BYTES if options.attention else 0)
    word += overlay_uri_bytes(overlay_size) if options.overlays else 0
    return images * (IMAGE_BYTES + captions * (CAPTION_BYTES + options.max_length * word))


def overlay_uri_bytes(size: int) -> int:
    """A size x size RGB PNG as a data URI, at worst: rows of raw pixels (zlib's stored blocks add
    5 bytes each 64 KB), in base64."""
    raw = size * (3 * size + 1)
    png = raw + 5 * (raw // 65535 + 1) + 1024
    return len("data:image/png;base64,") + 4 * -(-png // 3) + 4


def _check_response_size(options: CaptionOptions, images: int, predictor: Predictor, settings: Settings) -> None:
    """Refuse, before any work, a request whose answer could be over max_response_bytes, naming
    the option that weighs most."""
    h, w = predictor.model.grid
    size = response_bytes(options, images, h * w, settings.overlay_size)
    if size <= settings.max_response_bytes:
        return
    knob = (
        "overlays"
        if options.overlays
        else "attention"
        if options.attention
        else "num_captions"
        if options.method != "greedy" and options.num_captions > 1
        else "max_length"
    )
    raise APIError(
        422,
        "response_too_large",
        f"the answer could take {size / 2**20:.1f} MiB, over the limit of "
        f"{settings.max_response_bytes / 2**20:.1f} MiB: lower {knob} (or num_captions, max_length, "
        f"the number of images)",
        option=knob,
    )


def _encode(answer: dict) -> bytes:
    return RESPONSE.dump_json(RESPONSE.validate_python(answer), exclude_none=True)


def _check_num_captions(options: CaptionOptions, predictor: Predictor) -> None:
    """Beam search returns at most the different captions the vocabulary has: fewer than asked is an error."""
    if options.method != "beam":
        return
    most = distinct_captions(len(predictor.model.vocab) - len(SPECIALS), options.max_length)
    if options.num_captions > most:
        raise invalid_option(
            "num_captions",
            f"num_captions: this model has only {most} different captions of at most {options.max_length} words",
        )


def _prepare(
    predictor: Predictor, names: list[str], uploads: list[UploadFile], overlay_size: int | None
) -> tuple[list[PreparedImage], list[Image.Image | None]]:
    """Read, decode and preprocess every upload, one at a time; keep a small copy of the picture for overlays."""
    images, pictures = [], []
    for name, upload in zip(names, uploads):
        # One byte past the limit is enough for open_image to refuse the file as too_large.
        data = upload.file.read(predictor.limits.max_bytes + 1)
        try:
            image, picture = prepare_with_picture(predictor, data, overlay_size)
        except ImageError as e:
            raise APIError.from_image_error(e, name) from e
        images.append(image)
        pictures.append(picture)
    return images, pictures


def _add_overlays(results: list[dict], pictures: list[Image.Image | None]) -> None:
    for result, picture in zip(results, pictures):
        assert picture is not None  # overlays asked for: _prepare kept every picture
        for caption in result["captions"]:
            caption["overlays"] = [
                _png_data_uri(heatmap_overlay(picture, grid)) for grid in caption.get("attention", [])
            ]


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

"""POST /v1/captions: images in, n-best captions out, with attention grids or heatmaps on request.

The route checks the options and the answer's size, reads the uploads (streamed in by
api.form) and hands them to the batcher; a model worker decodes, captions, draws and encodes
them (api.workers), and the route joins the results into the answer.
"""

import asyncio
from collections.abc import Awaitable

from fastapi import APIRouter, Request, Response

from captioner.decoding import distinct_captions
from captioner.images import ImageError
from captioner.predictor import Predictor
from captioner.vocab import SPECIALS

from ..batcher import QueueFull, ShuttingDown, WorkerDead, WorkerLost
from ..deps import AdmissionDep, BatcherDep, CaptionFormDep, PredictorDep, SettingsDep
from ..errors import RETRY_AFTER, APIError, ClientGone, invalid_option, worker_dead, worker_lost
from ..schemas import ERROR_RESPONSES, CaptionOptions, CaptionResponse
from ..settings import Settings
from ..workers import Outcome

router = APIRouter(prefix="/v1", tags=["captions"])


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
) -> Response:
    """Send the images as files of the multipart field `images`, and the options as fields
    beside them. Results come in upload order, each named by its file. Any unusable file fails
    the whole request with the error naming that file; an unknown field is an error too."""
    options = form.options
    _check_num_captions(options, predictor)
    _check_response_size(options, len(form.images), predictor, settings)
    # One byte past the limit is enough for the worker to refuse a file as too_large.
    uploads = [await upload.read(predictor.limits.max_bytes + 1) for upload in form.images]
    job = batcher.submit(
        uploads,
        form.names,
        options.decode_options(),
        overlay_size=settings.overlay_size if options.overlays else None,
        keep_attention=options.attention,
    )
    try:
        outcomes = await _unless_gone(request, job, settings.request_timeout_s)
    except QueueFull:
        raise admission.overloaded() from None
    except ShuttingDown:
        raise APIError(503, "shutting_down", "the server is stopping", RETRY_AFTER) from None
    except WorkerLost:
        raise worker_lost() from None
    except WorkerDead:
        raise worker_dead() from None
    except TimeoutError:
        raise APIError(504, "timeout", f"the model did not answer within {settings.request_timeout_s:g} s") from None
    return Response(_answer(request.app.state.model_json, form.names, outcomes), media_type="application/json")


def _answer(model_json: bytes, names: list[str], outcomes: list[Outcome]) -> bytes:
    """The response body from the workers' JSON results; the first unreadable file fails it all."""
    for name, outcome in zip(names, outcomes):
        if isinstance(outcome, ImageError):
            raise APIError.from_image_error(outcome, name)
    results = b",".join(outcome for outcome in outcomes if isinstance(outcome, bytes))
    return b'{"model":' + model_json + b',"results":[' + results + b"]}"


async def _unless_gone(request: Request, answer: Awaitable[list[Outcome]], timeout: float) -> list[Outcome]:
    """`answer`, unless the client disconnects first (ClientGone) or it takes over `timeout`
    (TimeoutError). Either way the job is cancelled, and the model worker skips it."""
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
    raise TimeoutError()


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

"""Every error is JSON: {"error": {"code": "...", "message": "..."}}, with a stable code.

`APIError` is what the routes raise; the handlers installed by `install_error_handlers`
turn it, FastAPI's validation errors, Starlette's 404/405s and anything unexpected
into that one shape.
"""

import logging
from collections.abc import Sequence
from typing import cast

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ExceptionHandler

from captioner.images import ImageError

log = logging.getLogger("captioner.api")

# captioner.images.ImageError codes -> HTTP status
IMAGE_ERROR_STATUS = {
    "too_large": 413,
    "too_many_pixels": 413,
    "too_much_memory": 413,
    "unsupported_format": 415,
    "corrupt_image": 422,
    "unreadable": 400,
}

# status -> code, for errors that did not come with one (Starlette's own, FastAPI's)
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    408: "body_timeout",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


class APIError(HTTPException):
    """An error with a machine-readable code; extra keys (file, option) go into the body."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code
        self.message = message
        self.extra = {k: v for k, v in extra.items() if v is not None}

    @classmethod
    def from_image_error(cls, error: ImageError, file: str | None = None) -> "APIError":
        where = f"{file}: " if file else ""
        return cls(IMAGE_ERROR_STATUS.get(error.code, 400), error.code, where + error.message, file=file)

    def response(self) -> JSONResponse:
        body = {"error": {"code": self.code, "message": self.message, **self.extra}}
        return JSONResponse(body, status_code=self.status_code, headers=self.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, APIError):
        return exc.response()
    code = STATUS_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return APIError(exc.status_code, code, message, getattr(exc, "headers", None)).response()


RETRY_AFTER = {"Retry-After": "1"}  # a replacement (of a worker, of the server) is moments away


def worker_dead() -> APIError:
    return APIError(
        503,
        "model_worker_dead",
        "the model workers keep dying: this server is exiting, for its supervisor to start it afresh "
        "(its /healthz fails)",
        RETRY_AFTER,
    )


def worker_lost() -> APIError:
    return APIError(
        503,
        "model_worker_lost",
        "the model worker captioning this request died; another has taken its place: send it again",
        RETRY_AFTER,
    )


class ClientGone(Exception):
    """The client closed its connection before its answer: nobody is left to answer."""


def invalid_option(option: str, message: str) -> APIError:
    return APIError(422, "invalid_option", message, option=option)


def invalid_options(errors: Sequence) -> APIError:
    """Pydantic's errors about options as one 422 naming the first option at fault."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    details = "; ".join(f"{_field_name(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors)
    return invalid_option(_field_name(tuple(first.get("loc", ()))), details)


def _field_name(loc: tuple) -> str:
    """('body', 'beam_size') -> 'beam_size'; ('query', 'x', 0) -> 'x'."""
    names = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form") and not isinstance(p, int)]
    return ".".join(names) or "body"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = _field_name(tuple(first.get("loc", ())))
    if field in ("images", "body") and first.get("type") == "missing":
        return APIError(422, "missing_image", "send at least one file in the multipart form field 'images'").response()
    return invalid_options(errors).response()


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    # Never sent (the connection is gone); 499, as nginx logs it, is what the metrics count.
    return Response(status_code=499)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return APIError(500, "internal_error", "the server failed; the error is in its log").response()


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types a handler as taking any Exception, though it calls each only with its own class:
    # the casts say so for the handlers that take a narrower one.
    app.add_exception_handler(StarletteHTTPException, cast(ExceptionHandler, _http_error))
    app.add_exception_handler(RequestValidationError, cast(ExceptionHandler, _validation_error))
    app.add_exception_handler(ClientGone, cast(ExceptionHandler, _client_gone))
    app.add_exception_handler(Exception, _unexpected_error)

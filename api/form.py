"""The caption request's multipart form, parsed while it streams in, within bounds.

FastAPI's File and Form parameters parse a whole form with Starlette's defaults
(a thousand files, a thousand fields, files of any size) before the route sees
any of it. This parser refuses, as soon as the part that breaks a rule begins
or grows: a file under another name than `images`, an option nobody knows (a
misspelt `beam_sise` is an error, not a default), an option given twice or
longer than OPTION_BYTES, more than `max_images` files, a file over
`max_bytes`. `on_image` is called as each image's part begins, so the caller
can admit (or refuse) the image before its bytes are read.

The OpenAPI schema is made here too, from the same rules: `images` required,
1 to max_images files, no other fields than the options.
"""

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from .errors import APIError, ClientGone, invalid_option, invalid_options
from .schemas import CaptionOptions

IMAGES = "images"
OPTION_BYTES = 1024  # an option's value is a number, a word or a boolean
OPTIONS = frozenset(CaptionOptions.model_fields)
MEDIA_TYPES = "image/jpeg, image/png, image/webp, image/gif, image/bmp"


@dataclass
class CaptionForm:
    images: list[UploadFile]
    options: CaptionOptions

    @property
    def names(self) -> list[str]:
        return [f.filename or f"image{i}" for i, f in enumerate(self.images)]

    def close(self) -> None:
        for f in self.images:
            f.file.close()


class _BoundedParser(MultiPartParser):
    """Starlette's streaming multipart parser, with the caption form's rules checked per part."""

    def __init__(self, request: Request, max_images: int, max_bytes: int, on_image: Callable[[], None]):
        # Starlette's own counts stay open: the rules below are stricter and say which rule broke.
        super().__init__(
            request.headers,
            request.stream(),
            max_files=float("inf"),
            max_fields=float("inf"),
            max_part_size=OPTION_BYTES,
        )
        self.max_images, self.max_bytes, self.on_image = max_images, max_bytes, on_image
        self.images = 0
        self.seen_options: set[str] = set()
        self.file_bytes = 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        name = part.field_name
        if part.file is not None:
            if name != IMAGES:
                raise invalid_option(name, f"{name}: unknown file field; send the images as '{IMAGES}'")
            self.images += 1
            if self.images > self.max_images:
                raise _too_many_files(self.max_images)
            self.file_bytes = 0
            self.on_image()
        elif name == IMAGES:
            raise invalid_option(IMAGES, f"{IMAGES}: each one must be a file (a part with a filename)")
        elif name not in OPTIONS:
            raise invalid_option(name, f"{name}: unknown option; the options are {', '.join(sorted(OPTIONS))}")
        elif name in self.seen_options:
            raise invalid_option(name, f"{name}: given more than once")
        else:
            self.seen_options.add(name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:
            self.file_bytes += end - start
            if self.file_bytes > self.max_bytes:
                name = self._current_part.file.filename
                raise APIError(413, "too_large", f"{name}: the file is over {self.max_bytes} bytes", file=name)
        elif len(self._current_part.data) + end - start > OPTION_BYTES:
            name = self._current_part.field_name
            raise invalid_option(name, f"{name}: longer than {OPTION_BYTES} bytes")
        super().on_part_data(data, start, end)


async def read_caption_form(
    request: Request, max_images: int, max_bytes: int, on_image: Callable[[], None] = lambda: None
) -> CaptionForm:
    """The files and the options of a POST /v1/captions; APIError for anything outside the rules."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise _missing_image()
    parser = _BoundedParser(request, max_images, max_bytes, on_image)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise APIError(400, "bad_request", f"the multipart form cannot be read: {e.message}") from None
    except ClientDisconnect:  # Starlette's parser has closed the files on its way out
        raise ClientGone() from None
    images = [v for k, v in form.multi_items() if isinstance(v, UploadFile)]
    fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
    try:
        options = CaptionOptions.model_validate(fields)
    except ValidationError as e:
        for f in images:
            f.file.close()
        raise invalid_options(e.errors()) from None
    if not images:
        raise _missing_image()
    return CaptionForm(images, options)


def _too_many_files(max_images: int) -> APIError:
    """422, as for any request outside the schema (`images` has maxItems): the count of files is
    no size, and a few small files over the count make no large body (413)."""
    return APIError(
        422,
        "too_many_files",
        f"more than {max_images} files sent; at most {max_images} per request",
        option=IMAGES,
    )


def _missing_image() -> APIError:
    return APIError(422, "missing_image", f"send at least one file in the multipart form field '{IMAGES}'")


def request_body_schema(max_images: int) -> dict:
    """The OpenAPI requestBody of POST /v1/captions: what the parser above accepts.

    A form has no null: an option left unset is left out, so `seed` is an integer or absent; and
    it has only text, so a boolean is any word the server reads as one. The rules between options
    are the alternatives of `anyOf`: greedy gives one caption, sampling any number, beam search at
    most beam_size (3 when not sent)."""
    options = CaptionOptions.model_json_schema()
    properties = {name: _form_boolean(_not_null(p)) for name, p in options["properties"].items()}
    images = {
        "type": "array",
        "minItems": 1,
        "maxItems": max_images,
        "items": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"},
        "description": f"one to {max_images} images (JPEG, PNG, WebP, GIF, BMP)",
    }
    beam = {"const": "beam"}
    default_beams, max_captions = properties["beam_size"]["default"], properties["num_captions"]["maximum"]
    rules = [
        {"properties": {"method": {"const": "greedy"}, "num_captions": {"const": 1}}, "required": ["method"]},
        {"properties": {"method": {"const": "sample"}}, "required": ["method"]},
    ]
    # Beam search, one alternative per num_captions n: beam_size at least n, and sent unless its
    # default is enough. No `not` or `if`: schemathesis' coverage phase (4.32) fails on either
    # beside a file field ("Unsupported type: 'Binary'"), so the rules only list what is allowed.
    rules += [
        {
            "properties": {"method": beam, "num_captions": {"const": n}, "beam_size": {"minimum": n}},
            **({} if n <= default_beams else {"required": ["num_captions", "beam_size"]}),
        }
        for n in range(1, max_captions + 1)
    ]
    schema = {
        "title": "CaptionRequest",
        "type": "object",
        "required": [IMAGES],
        "additionalProperties": False,
        "properties": {IMAGES: images, **properties},
        "anyOf": rules,
    }
    return {
        "required": True,
        "content": {"multipart/form-data": {"schema": schema, "encoding": {IMAGES: {"contentType": MEDIA_TYPES}}}},
    }


# The words a boolean option may be sent as (pydantic's, read in any case): a form carries text.
BOOLEAN_WORDS = ("true", "false", "1", "0", "yes", "no", "on", "off", "t", "f", "y", "n")


def _form_boolean(prop: dict) -> dict:
    """A boolean option: true or false, or any word the server reads as one ("1", "on", "Yes").

    Listed so that the schema refuses what the server refuses and no more. The pattern's end is
    `(?![\\s\\S])`, not `$`, which in Python (and so in generators) also matches before a final newline."""
    if prop.get("type") != "boolean":
        return prop
    words = "|".join("".join(f"[{c.upper()}{c}]" if c.isalpha() else c for c in word) for word in BOOLEAN_WORDS)
    spelled = {
        "type": "string",
        "pattern": f"^(?:{words})(?![\\s\\S])",
        "description": "in any case: " + ", ".join(BOOLEAN_WORDS),
    }
    return {**{k: v for k, v in prop.items() if k != "type"}, "anyOf": [{"type": "boolean"}, spelled]}


def _not_null(prop: dict) -> dict:
    """`int | None = None` as a form field: an integer, or the field left out."""
    if "anyOf" not in prop:
        return prop
    rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    (kind,) = [p for p in prop["anyOf"] if p.get("type") != "null"]
    return {**kind, **rest}

"""Request and response schemas, named by role; their examples show up in /docs."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from captioner.decoding import DecodeOptions


class CaptionOptions(DecodeOptions):
    """How to decode: the form fields sent beside the files. The library's options and limits,
    read from text (strict=False: a form sends "3"), plus the heatmaps only the API draws."""

    model_config = ConfigDict(strict=False, extra="ignore")  # the form holds the files too

    overlays: bool = Field(False, description="return each word's heatmap over the picture as a PNG data URI")

    def decode_options(self) -> DecodeOptions:
        """The library's options; overlays need the attention grids."""
        fields = self.model_dump(exclude={"overlays"})
        return DecodeOptions(**{**fields, "attention": self.attention or self.overlays})


class Caption(BaseModel):
    text: str
    tokens: list[str]
    log_prob: float = Field(description="summed log-probability of the words and <end>")
    attention: list[list[list[float]]] | None = Field(
        None, description="per word, the (h, w) attention grid over the picture"
    )
    overlays: list[str] | None = Field(None, description="per word, a PNG data URI of its heatmap over the picture")


class ImageResult(BaseModel):
    file: str = Field(description="the uploaded file's name; results come in upload order")
    width: int
    height: int
    method: str
    attention_grid: tuple[int, int] = Field(description="(h, w) of the attention grids")
    captions: list[Caption] = Field(description="best first")


class ModelSummary(BaseModel):
    """Which model answered: enough to tell two servers apart. GET /v1/model has the whole card."""

    checkpoint: str = Field(description="the checkpoint's file name")
    encoder: str
    attention: bool = Field(description="whether the decoder attends (and so whether heatmaps exist)")
    cell: str
    vocab_size: int
    attention_grid: tuple[int, int]


class CaptionResponse(BaseModel):
    model: ModelSummary
    results: list[ImageResult]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": {
                        "checkpoint": "model.safetensors",
                        "encoder": "efficientnet_lite0",
                        "attention": True,
                        "cell": "lstm",
                        "vocab_size": 40,
                        "attention_grid": [7, 7],
                    },
                    "results": [
                        {
                            "file": "shapes.png",
                            "width": 224,
                            "height": 224,
                            "method": "beam",
                            "attention_grid": [7, 7],
                            "captions": [
                                {
                                    "text": "a red circle above a blue square",
                                    "log_prob": -1.23,
                                    "tokens": ["a", "red", "circle", "above", "a", "blue", "square"],
                                },
                                {
                                    "text": "a red circle and a blue square",
                                    "log_prob": -2.71,
                                    "tokens": ["a", "red", "circle", "and", "a", "blue", "square"],
                                },
                            ],
                        }
                    ],
                }
            ]
        }
    )


class Limits(BaseModel):
    max_beam_size: int
    max_captions: int
    max_length: int
    max_top_k: int
    max_images: int = Field(description="files per request")
    max_bytes: int = Field(description="bytes per file")
    max_pixels: int = Field(description="width x height per image")
    max_decode_bytes: int = Field(
        description="memory one image may take to decode (about 10 bytes a pixel, 17 with transparency)"
    )
    max_response_bytes: int = Field(description="the largest answer a request may ask for")
    formats: list[str]


class EncoderRuntime(BaseModel):
    """What runs the encoder (the decoder always runs on torch, in fp32)."""

    backend: Literal["torch", "onnxruntime"] = Field(description="onnxruntime: the checkpoint's exported graph")
    precision: str = Field(description="fp32; int8 (an int8 export); bf16 or fp16 (torch with amp)")
    device: str = Field(description="cpu (always, for ONNX Runtime), cuda:0, ...")


class ModelCard(ModelSummary):
    """What the loaded model is, what it was trained on and how it scored (the card saved with it)."""

    runtime: EncoderRuntime

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "checkpoint": "model.safetensors",
                    "encoder": "efficientnet_lite0",
                    "attention": True,
                    "cell": "lstm",
                    "num_layers": 1,
                    "vocab_size": 40,
                    "attention_grid": [7, 7],
                    "image_size": 224,
                    "runtime": {"backend": "onnxruntime", "precision": "fp32", "device": "cpu"},
                    "config": {"encoder": "efficientnet_lite0", "hidden_dim": 512},
                    "training_data": "the Shapes world (3000 images)",
                    "scores": {"CIDEr": 2.1, "BLEU-4": 0.62},
                    "vocabulary": ["a", "red", "circle"],
                    "limits": {
                        "max_beam_size": 10,
                        "max_captions": 10,
                        "max_length": 50,
                        "max_top_k": 1000,
                        "max_images": 16,
                        "max_bytes": 10485760,
                        "max_pixels": 40000000,
                        "max_decode_bytes": 536870912,
                        "max_response_bytes": 67108864,
                        "formats": ["JPEG", "PNG", "WEBP", "GIF", "BMP"],
                    },
                }
            ]
        },
    )

    num_layers: int
    image_size: int
    config: dict
    vocabulary: list[str] = Field(description="every word the model can say (special tokens left out)")
    limits: Limits


class ErrorDetail(BaseModel):
    code: str = Field(examples=["unsupported_format"])
    message: str = Field(examples=["notes.txt: not an image Pillow can identify"])
    file: str | None = Field(None, description="the uploaded file at fault, if one is")
    option: str | None = Field(None, description="the option at fault, if one is")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: str = Field(examples=["ok"])


class Health(Status):
    workers: int | None = Field(None, description="model workers the server keeps", examples=[2])
    workers_alive: int | None = Field(
        None, description="of them, those running (fewer only while a dead one is replaced)", examples=[2]
    )


def _error(code: str, message: str, **extra: str) -> tuple[str, dict[str, Any]]:
    """One named example of an error body."""
    return code, {"value": {"error": {"code": code, "message": message, **extra}}}


def _errors(
    description: str, *examples: tuple[str, dict[str, Any]], plain: str | None = None, **more: Any
) -> dict[str, Any]:
    """A status as documented: the error's shape, and an example of every code it comes with; and
    `plain`, the text/plain answer uvicorn itself may give with this status."""
    content: dict[str, Any] = {"application/json": {"examples": dict(examples)}}
    if plain is not None:
        content["text/plain"] = {"schema": {"type": "string"}, "example": plain}
    return {"model": ErrorResponse, "description": description, "content": content, **more}


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}

# Every status POST /v1/captions answers with, each with every code it comes with.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _errors(
        "the multipart form cannot be read",
        _error("bad_request", "the multipart form cannot be read: Invalid multipart data."),
    ),
    401: _errors(
        "the API key is set and the request has not sent it",
        _error("unauthorized", "send the API key in the X-API-Key header"),
        headers={"WWW-Authenticate": {"description": "X-API-Key", "schema": {"type": "string"}}},
    ),
    408: _errors(
        "the body did not arrive within body_timeout_s of the head; the connection is closed",
        _error("body_timeout", "the request body did not arrive within 60 s"),
    ),
    413: _errors(
        "the body is over the server's limit, a file over max_bytes, or an image, read from its header, "
        "over max_pixels or max_decode_bytes",
        _error("too_large", "big.png: the file is over 10485760 bytes", file="big.png"),
        _error("too_many_pixels", "big.png: 20000x20000 is over the limit of 40000000 pixels", file="big.png"),
        _error(
            "too_much_memory",
            "big.png: 6000x6000 in mode RGBA takes about 584 MiB to decode, over the limit of 512 MiB",
            file="big.png",
        ),
    ),
    415: _errors(
        "a file is not an image in one of the accepted formats",
        _error("unsupported_format", "notes.txt: not an image Pillow can identify", file="notes.txt"),
    ),
    422: _errors(
        "the request is outside the schema (an option invalid, unknown or repeated; no file; more than "
        "max_images files), its answer could be over max_response_bytes, or an image is corrupt",
        _error("invalid_option", "beam_size: Input should be less than or equal to 10", option="beam_size"),
        _error("missing_image", "send at least one file in the multipart form field 'images'"),
        _error("too_many_files", "more than 16 files sent; at most 16 per request", option="images"),
        _error(
            "response_too_large",
            "the answer could take 80.2 MiB, over the limit of 64.0 MiB: lower overlays (or num_captions, "
            "max_length, the number of images)",
            option="overlays",
        ),
        _error("corrupt_image", "a.png: cannot decode the image: image file is truncated", file="a.png"),
    ),
    500: _errors(
        "the server failed (a bug): the error is in its log",
        _error("internal_error", "the server failed; the error is in its log"),
    ),
    503: _errors(
        "the server is full (come back after Retry-After), stopping, the model worker captioning the request "
        "died (it has been replaced: send it again), or the workers keep dying and the server is exiting; or, "
        "as text/plain from uvicorn, it holds limit_concurrency connections already",
        _error("overloaded", "64 images are in flight, the most this server holds is 64; retry after ..."),
        _error("shutting_down", "the server is stopping"),
        _error(
            "model_worker_lost",
            "the model worker captioning this request died; another has taken its place: send it again",
        ),
        _error(
            "model_worker_dead",
            "the model workers keep dying: this server is exiting, for its supervisor to start it afresh",
        ),
        plain="Service Unavailable",
        headers=RETRY_AFTER,
    ),
    504: _errors(
        "the model did not answer within request_timeout_s",
        _error("timeout", "the model did not answer within 60 s"),
    ),
}

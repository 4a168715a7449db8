"""`captioner serve`: the HTTP API and its web page, under uvicorn.

    captioner serve                                   # the model `captioner demo` trained
    captioner serve --checkpoint runs/shapes/best.safetensors --port 8080
    CAPTIONER_MAX_BATCH_SIZE=32 captioner serve --max-wait-ms 10

Every flag is a field of `api.settings.Settings`: --max-batch-size is
max_batch_size is CAPTIONER_MAX_BATCH_SIZE. Flags override the environment.
On SIGTERM or Ctrl-C the server stops accepting, lets in-flight requests finish
(up to --timeout-graceful-shutdown seconds), then stops the model worker.
"""

import argparse
import copy
import sys

from pydantic import ValidationError

from .settings import Settings


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting. Values go to pydantic as text, so the flag and the
    environment variable are parsed and checked by the very same rules."""
    for name, field in Settings.model_fields.items():
        default = "" if field.is_required() or field.default_factory else f" (default {field.default})"
        parser.add_argument(flag(name), dest=name, default=None, metavar=name.upper(),
                            help=f"{field.description}{default}; env CAPTIONER_{name.upper()}")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {name: value for name, value in vars(args).items()
                 if name in Settings.model_fields and value is not None}
    return Settings(**overrides)


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        for error in e.errors():
            name = str(error["loc"][0]) if error["loc"] else "?"
            print(f"captioner serve: {flag(name)}: {error['msg']}", file=sys.stderr)
        return 2

    import uvicorn

    from .app import create_app, missing_model_message

    if not settings.checkpoint.is_file():
        print(f"captioner serve: {missing_model_message(settings.checkpoint)}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                log_config=log_config(settings.log_level), timeout_graceful_shutdown=settings.timeout_graceful_shutdown)
    return 0


def log_config(level: str) -> dict:
    """uvicorn's logging, with the service's own logger (captioner.*) printed the same way."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["captioner"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config

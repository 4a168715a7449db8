"""`captioner serve`: the HTTP API and its web page, under uvicorn.

    captioner serve                                   # the model `captioner demo` trained
    captioner serve --checkpoint runs/shapes/best.safetensors --port 8080
    CAPTIONER_MAX_BATCH_SIZE=32 captioner serve --max-wait-ms 10

Every flag is a field of `api.settings.Settings`: --max-batch-size is
max_batch_size is CAPTIONER_MAX_BATCH_SIZE. Flags override the environment.
On SIGTERM or Ctrl-C the server stops accepting, lets in-flight requests finish
(up to --timeout-graceful-shutdown seconds), then stops the model worker.

Slow clients are cut off: a request's head must come whole within
--header-timeout-s (api.connections), its body within --body-timeout-s (api.guard).
A client refused before its body has all arrived still gets its answer: the
connection lingers within the body's bounds (api.connections).
The model runs in --workers processes beside the server's (api.workers).
"""

import argparse
import copy
import sys
from typing import cast

from pydantic import ValidationError

from runtime.flags import add_model_flags, flag_errors, given_flags

from .settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser, Settings, title="settings", env_prefix="CAPTIONER_", skip=("api_key",))


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags override the environment: pydantic-settings reads it for what is not given."""
    return Settings(**given_flags(Settings, args))


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        for line in flag_errors(e):
            print(f"captioner serve: {line}", file=sys.stderr)
        return 2

    import uvicorn

    from .app import create_app
    from .workers import missing_model_message

    if not settings.checkpoint.is_file():
        print(f"captioner serve: {missing_model_message(settings.checkpoint)}", file=sys.stderr)
        return 2
    from .connections import MAX_HEAD_BYTES, connection_protocol

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level),
        # uvicorn annotates int, but hands the seconds to asyncio.wait_for, which takes a float
        timeout_graceful_shutdown=cast(int, settings.timeout_graceful_shutdown),
        root_path=settings.root_path,
        http=connection_protocol(
            settings.header_timeout_s, settings.body_timeout_s, settings.max_body_bytes, settings.http
        ),
        loop="auto",  # uvloop where it is installed
        timeout_keep_alive=settings.timeout_keep_alive,
        limit_concurrency=settings.limit_concurrency,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
    return 0


def log_config(level: str) -> dict:
    """uvicorn's logging, with the service's own logger (captioner.*) printed the same way."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["captioner"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config

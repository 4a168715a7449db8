"""The server's settings: one BaseSettings class, read from CAPTIONER_* variables.

Each field has the same snake_case name as its environment variable
(CAPTIONER_MAX_BATCH_SIZE) and its `captioner serve` flag (--max-batch-size);
flags override the environment.
"""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from runtime.cpus import available_cpus
from runtime.home import default_checkpoint

MAX_DEFAULT_WORKERS = 4  # each holds a model and torch's runtime, a few hundred MB


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAPTIONER_", extra="ignore")

    checkpoint: Path = Field(
        default_factory=default_checkpoint, description="the model to serve (default: the one `captioner demo` trains)"
    )
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, mps")
    amp: bool = Field(
        False,
        description="mixed-precision encoder: bf16 on a CPU (fast where it has AMX), "
        "fp16 on a GPU; captions may differ slightly",
    )
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="what runs the encoder: onnxruntime (a checkpoint made by `captioner export`, on a CPU), "
        "torch, or auto: onnxruntime where the checkpoint has its graph and the device is a CPU without amp",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    threads: int = Field(
        default_factory=available_cpus,
        ge=1,
        description="torch threads, shared among the model workers (default: the usable cores, "
        "within a container's CPU quota)",
    )
    workers: int = Field(
        default_factory=lambda: min(available_cpus(), MAX_DEFAULT_WORKERS),
        ge=1,
        le=64,
        description="model worker processes, each with the model and its share of the threads (default: "
        "one a core, at most 4); on a GPU, or at 1, a thread of the server instead",
    )
    max_worker_restarts: int = Field(
        5,
        ge=0,
        description="model workers that die (killed, out of memory, crashed) are started again, at most this "
        "many times within restart_window_s; one more death and the server exits with status 1, for its "
        "supervisor (Docker, systemd, Kubernetes) to start it afresh",
    )
    restart_window_s: float = Field(
        60.0, gt=0, description="the window of seconds in which max_worker_restarts are counted"
    )
    max_batch_size: int = Field(16, ge=1, le=512, description="images per model call")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=10_000,
        description="how long a batch waits for more requests, even on an idle server (while every worker is "
        "busy, requests gather by themselves)",
    )
    busy_wait_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="how long a freed worker's batch waits for more requests while another worker is busy "
        "(the clients just answered are sending their next ones): fuller batches under load",
    )
    queue_size: int = Field(
        64,
        ge=1,
        description="images admitted at once (being received, decoded, waiting for "
        "or in the model); beyond it: 503 with Retry-After",
    )
    max_images: int = Field(16, ge=1, description="files per request")
    max_bytes: int = Field(10 * 1024 * 1024, ge=1, description="bytes per file")
    max_pixels: int = Field(40_000_000, ge=1, description="width x height per image, read from its header")
    max_decode_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1,
        description="memory one image may take to decode, estimated from its header (size, "
        "alpha); each model worker decodes one image at a time",
    )
    max_response_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="the largest answer a request may ask for (images x captions x words, "
        "overlays weighing most), estimated before any work; beyond it: 422",
    )
    overlay_size: int = Field(256, ge=16, le=1024, description="longest side of heatmap overlay PNGs")
    request_timeout_s: float = Field(60.0, gt=0, description="longest wait for the model; beyond it: 504")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="seconds a connection has to send a request's line and "
        "headers (from connecting, or from its last answer); "
        "beyond them it is closed",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="seconds a request's body has to arrive, from its head; beyond them: 408 and the connection closed",
    )
    http: Literal["auto", "httptools", "h11"] = Field(
        "auto", description="HTTP parser: httptools (in C) where it is installed, else h11 (pure Python)"
    )
    timeout_keep_alive: int = Field(5, ge=1, description="seconds an idle connection is kept between requests")
    limit_concurrency: int = Field(
        512, ge=1, description="connections and requests at once; beyond them uvicorn answers 503"
    )
    api_key: SecretStr | None = Field(
        None,
        description="when set, every path but the public ones needs the "
        "header X-API-Key (environment only: never on argv)",
    )
    api_key_file: Path | None = Field(
        None, description="a file holding the API key (a Docker or Kubernetes secret), instead of CAPTIONER_API_KEY"
    )
    public_metrics: bool = Field(
        False, description="serve /metrics without the API key, for a scraper that cannot send X-API-Key"
    )
    root_path: str = Field("", description="the path prefix a proxy serves this under (uvicorn's --root-path)")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed to call the API from a browser"
    )
    timeout_graceful_shutdown: float = Field(
        15.0, ge=0, description="seconds in-flight requests get to finish on SIGTERM"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="log level"
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value):
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _device_this_machine_has(cls, value):
        from runtime.devices import resolve_device  # torch: only once a device is asked for

        return str(resolve_device(value))

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value):
        return None if value == "" else value

    @model_validator(mode="after")
    def _key_from_its_file(self):
        """The key file's first line (a trailing newline is the editor's, not the key's)."""
        if self.api_key_file is None:
            return self
        if self.api_key is not None:
            raise ValueError("set the API key or its file (CAPTIONER_API_KEY or CAPTIONER_API_KEY_FILE), not both")
        try:
            key = self.api_key_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the API key file {self.api_key_file}: {e}") from None
        if not key:
            raise ValueError(f"the API key file {self.api_key_file} is empty")
        self.api_key = SecretStr(key)
        return self

    @field_validator("root_path")
    @classmethod
    def _root_path_shape(cls, value: str) -> str:
        if value and (not value.startswith("/") or value.endswith("/")):
            raise ValueError("a root path starts with / and does not end with one, as /captioner")
        return value

    @property
    def max_body_bytes(self) -> int:
        """The largest request body worth reading: every file at its limit, plus form fields."""
        return self.max_images * self.max_bytes + 64 * 1024


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""Prometheus metrics, in a registry of the app's own (so several apps in one process never clash)."""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "captioner_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=self.registry
        )
        self.errors = Counter(
            "captioner_http_errors",
            "HTTP answers with a status of 400 or more",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "captioner_http_request_duration_seconds",
            "time to answer a request",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "captioner_batch_size", "images per model call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge(
            "captioner_queue_depth", "requests waiting for the model worker", registry=self.registry
        )
        self.images = Counter("captioner_images", "images captioned", registry=self.registry)
        self.abandoned = Counter(
            "captioner_abandoned_images",
            "images never captioned: their client had gone (or stopped waiting) before the model got to them",
            registry=self.registry,
        )
        self.worker_restarts = Counter(
            "captioner_worker_restarts",
            "model workers started again after dying (killed, out of memory, crashed)",
            registry=self.registry,
        )
        self.workers_alive = Gauge(
            "captioner_workers_alive",
            "model workers running (the pool's size but while one is replaced)",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "captioner_images_in_flight",
            "images admitted and not yet answered (being received, decoded, waiting for or in the model)",
            registry=self.registry,
        )


# Label values come from these sets only: a client makes up methods and paths at will, and every
# new label value would be a new series in every scrape, for ever.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER_METHOD = "other"
UNMATCHED = "unmatched"


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER_METHOD


def route_label(scope: Scope) -> str:
    """The matched route's template (/v1/captions, /static), or one label for everything else."""
    return getattr(scope.get("route"), "path", None) or UNMATCHED


class MetricsMiddleware:
    """Counts every HTTP answer by route template and known method (not raw path or method, which
    would explode the label set)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            label = route_label(scope)
            self.metrics.requests.labels(label, method_label(scope["method"]), str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)

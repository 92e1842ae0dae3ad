"""Prometheus metrics, one registry per app (several apps can live in one process, e.g. in tests)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_COST_BUCKETS = (1e2, 1e3, 1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 5e6)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "iwae_requests", "HTTP requests by route, method and status.", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "iwae_request_duration_seconds",
            "HTTP request latency by route, method and status.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "iwae_queue_wait_seconds",
            "Time a request waited in its model's queue before its batch started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "iwae_batch_size", "Requests per computed batch.", ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_images = Histogram(
            "iwae_batch_images", "Images per computed batch.", ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_cost = Histogram(
            "iwae_batch_cost",
            "Cost (images × k) per computed batch.",
            ["model"],
            buckets=BATCH_COST_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "iwae_batch_compute_seconds",
            "Compute time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.samples = Counter(
            "iwae_samples_evaluated", "Importance samples evaluated (images × k).", ["model"], registry=r
        )
        self.queue_depth = Gauge("iwae_queue_depth", "Requests waiting in the model's queue.", ["model"], registry=r)
        self.rejected = Counter(
            "iwae_queue_rejections", "Requests refused with 503 because the queue was full.", ["model"], registry=r
        )
        self.dropped = Counter(
            "iwae_requests_dropped",
            "Queued requests dropped before compute (client gone or timed out).",
            ["model", "reason"],
            registry=r,
        )
        self.models_loaded = Gauge("iwae_models_loaded", "Models loaded.", registry=r)
        self.ready = Gauge("iwae_ready", "1 once every model is loaded and warmed up.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not the raw path: bounded cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(label, method, str(status)).inc()
            self.metrics.latency.labels(label, method, str(status)).observe(time.perf_counter() - start)

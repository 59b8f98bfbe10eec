"""Prometheus metrics: request counts and latency per route template, index size, versions.

Each app gets its own registry (several apps live in one test process; the default global
registry would refuse the second registration).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests",
            "HTTP requests by route template",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.index_size = Gauge("index_vectors", "Vectors in the loaded index", registry=self.registry)
        self.versions = Info("retrieval", "Loaded model and index versions", registry=self.registry)
        self.cache_entries = Gauge(
            "cache_entries", "Entries held by the search caches", ["cache"], registry=self.registry
        )
        self.cache_hits = Gauge(
            "cache_hits", "Lookups served from a search cache since start", ["cache"], registry=self.registry
        )
        self.cache_misses = Gauge(
            "cache_misses", "Lookups a search cache sent to the database", ["cache"], registry=self.registry
        )
        self.embed_batches = Gauge(
            "embed_batches", "Forward passes run by the micro-batcher", registry=self.registry
        )


class MetricsMiddleware:
    """Pure ASGI (no per-request task like BaseHTTPMiddleware): labels by the matched route's
    template (`/images/{image_id}`), so ids do not explode the label space. Every response also
    says where its time went (`Server-Timing`, read by browsers' dev tools and Resource Timing):
    `body` from the request's headers to its last body byte, `app` to the response's start."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}
        body_received: list[float] = []

        async def receive_timed() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_received.append(time.perf_counter())
            return message

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                timing = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
                if body_received:
                    timing = f"body;dur={(body_received[0] - started) * 1000:.1f}, {timing}"
                headers = [*message.get("headers", []), (b"server-timing", timing.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive_timed, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            self.metrics.requests.labels(method, template, str(status["code"])).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)

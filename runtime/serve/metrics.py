"""Prometheus metrics of one server (its own registry, so tests can run several)."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sdrt.result import Timings

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)


class Metrics:
    def __init__(self, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sdrt_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.request_seconds = Histogram("sdrt_request_seconds", "Request latency, arrival to answer",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("sdrt_stage_seconds", "Time per engine call by stage", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("sdrt_batch_rows", "Images per engine call (request batching)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("sdrt_images_generated", "Images generated", registry=r)
        self.errors = Counter("sdrt_errors", "Errors by kind", ["kind"], registry=r)
        self.queue_depth = Gauge("sdrt_queue_depth", "Images waiting in the queue", registry=r)
        self.queue_depth.set_function(queue_depth)

    def observe(self, kind: str, value: Any) -> None:
        """The worker's hook: ("batch", rows), ("timings", Timings), ("images", n)."""
        if kind == "batch":
            self.batch_rows.observe(value)
        elif kind == "images":
            self.images.inc(value)
        elif kind == "timings":
            t: Timings = value
            for stage, seconds in (("text_encoder", t.text_encoder_s), ("steps", t.steps_s),
                                   ("decode", t.decode_s), ("total", t.total_s)):
                self.stage_seconds.labels(stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

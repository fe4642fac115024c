"""Prometheus metrics for `homeforge serve`, in a registry of their own (one per app)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# up to 10 minutes: a long generation under load must land in a bucket, not only in +Inf
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("homeforge_requests_total", "HTTP requests by route, status and key role",
                                ["route", "status", "role"], registry=r)
        self.latency = Histogram("homeforge_request_latency_seconds", "end-to-end request latency (to the last byte)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("homeforge_time_to_first_token_seconds", "time from arrival to the first generated token",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("homeforge_prompt_tokens_total", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("homeforge_completion_tokens_total",
                                         "completion tokens generated (also for requests whose client left)",
                                         registry=r)
        self.queue_depth = Gauge("homeforge_queue_depth", "requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("homeforge_running_batch_size", "sequences in the running batch", registry=r)
        self.rejected = Counter("homeforge_rejected_total", "requests refused before running, by reason",
                                ["reason"], registry=r)
        self.audit_errors = Gauge("homeforge_audit_errors", "audit lines that could not be written", registry=r)

    def watch(self, engine: Callable[[], object | None]) -> None:
        """Read the batch and queue gauges from the engine at scrape time (never stale after aborts)."""
        self.batch_size.set_function(lambda: _size(engine(), "batch_size"))
        self.queue_depth.set_function(lambda: _size(engine(), "queue_depth"))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _size(engine, what: str) -> float:
    return float(getattr(engine, what)()) if engine is not None else 0.0

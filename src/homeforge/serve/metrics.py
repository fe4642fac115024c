"""Prometheus metrics for `homeforge serve`, in a registry of their own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


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
        self.completion_tokens = Counter("homeforge_completion_tokens_total", "completion tokens generated",
                                         registry=r)
        self.queue_depth = Gauge("homeforge_queue_depth", "requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("homeforge_running_batch_size", "sequences in the running batch", registry=r)
        self.rejected = Counter("homeforge_rejected_total", "requests refused before running, by reason",
                                ["reason"], registry=r)
        self.audit_errors = Gauge("homeforge_audit_errors", "audit lines that could not be written", registry=r)

    def on_step(self, batch: int, queue: int) -> None:
        self.batch_size.set(batch)
        self.queue_depth.set(queue)

    def render(self) -> bytes:
        return generate_latest(self.registry)

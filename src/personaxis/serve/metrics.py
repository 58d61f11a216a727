"""Prometheus metrics, one registry per app so that several servers (or tests) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from personaxis.inference.plan import PROJECTION_BUCKETS


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "personaxis_requests", "HTTP requests by path and status", ["path", "status"], registry=r
        )
        self.tokens = Counter("personaxis_generated_tokens", "Reply tokens generated", registry=r)
        self.tokens_per_second = Gauge(
            "personaxis_tokens_per_second", "Aggregate decode throughput of the latest step", registry=r
        )
        self.batch_size = Histogram(
            "personaxis_batch_size", "Requests in each decode step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.ttft = Histogram(
            "personaxis_time_to_first_token_seconds",
            "From request accepted to first reply token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.turn_projection = Histogram(
            "personaxis_turn_projection",
            "Mean projection of each assistant turn on a monitored vector",
            ["vector"],
            buckets=PROJECTION_BUCKETS,
            registry=r,
        )
        self.capped = Counter("personaxis_capped_requests", "Requests served with a cap", ["source"], registry=r)
        self.cap_activations = Counter(
            "personaxis_cap_activations", "Conversations whose closed loop switched capping on", registry=r
        )
        self.alarms = Counter("personaxis_alarms", "Turns whose recent projection fell below threshold", registry=r)
        self.queue = Gauge("personaxis_queue_depth", "Requests waiting for the model", registry=r)

    def batch(self, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.tokens.inc(tokens)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

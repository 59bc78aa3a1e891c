"""/metrics in the Prometheus text format (prometheus_client, one registry per app).

ftf_requests_total{route,status}          requests answered
ftf_request_errors_total{route,code}      4xx/5xx answers by error code
ftf_request_seconds{route}                latency histogram (streams: until the last event)
ftf_time_to_first_token_seconds           streaming: from admission to a summary's first text (per dialogue)
ftf_inter_token_seconds                   streaming: between a summary's pieces of text (about one per token)
ftf_flagged_summaries_total{check}        summaries a faithfulness check flagged (ftf.checks)
ftf_check_errors_total                    checks that failed internally (the summary was still returned)
ftf_queue_length                          dialogues and long-job turns waiting for the model
ftf_active_requests                       requests admitted and not finished
ftf_batch_size                            dialogues (or windows) per engine batch, histogram
ftf_batch_seconds                         engine batch duration, histogram
ftf_generated_tokens_total                new tokens generated
ftf_generation_seconds_total              time spent generating
ftf_tokens_per_second                     generated tokens/s over the last 50 batches
ftf_cancelled_total{reason}               work stopped: client_left, deadline, budget, shutdown
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

disable_created_metrics()   # no *_created series: they double the output and no dashboard reads them

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self, queue_length: Callable[[], int], active: Callable[[], int]):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("ftf_requests", "Requests answered", ["route", "status"], registry=registry)
        self.errors = Counter("ftf_request_errors", "Error answers by code", ["route", "code"], registry=registry)
        self.latency = Histogram("ftf_request_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=registry)
        self.first_token = Histogram("ftf_time_to_first_token_seconds", "Streaming: admission to a summary's first "
                                     "text", buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token = Histogram("ftf_inter_token_seconds", "Streaming: time between a summary's pieces of text",
                                     buckets=TOKEN_BUCKETS, registry=registry)
        self.flagged = Counter("ftf_flagged_summaries", "Summaries a faithfulness check flagged", ["check"],
                               registry=registry)
        self.check_errors = Counter("ftf_check_errors", "Checks that failed internally", registry=registry)
        Gauge("ftf_queue_length", "Dialogues and long-job turns waiting for the model",
              registry=registry).set_function(queue_length)
        Gauge("ftf_active_requests", "Requests admitted and not finished", registry=registry).set_function(active)
        self.batch_size = Histogram("ftf_batch_size", "Dialogues or windows per engine batch", buckets=BATCH_BUCKETS,
                                    registry=registry)
        self.batch_seconds = Histogram("ftf_batch_seconds", "Engine batch duration", buckets=LATENCY_BUCKETS,
                                       registry=registry)
        self.tokens = Counter("ftf_generated_tokens", "New tokens generated", registry=registry)
        self.generation_seconds = Counter("ftf_generation_seconds", "Time spent generating", registry=registry)
        self.speed = Gauge("ftf_tokens_per_second", "Generated tokens/s over the last 50 batches", registry=registry)
        self.cancelled = Counter("ftf_cancelled", "Work stopped before it finished", ["reason"], registry=registry)
        self._recent: deque[tuple[int, float]] = deque(maxlen=50)

    def batch(self, size: int, seconds: float, tokens: int) -> None:
        """One engine batch finished (called from the model thread)."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.tokens.inc(tokens)
        self.generation_seconds.inc(seconds)
        self._recent.append((tokens, seconds))
        total = sum(s for _, s in self._recent)
        self.speed.set(sum(t for t, _ in self._recent) / total if total else 0.0)

    def token_time(self, seconds: float, first: bool) -> None:
        """A streamed piece of text: `seconds` since admission (the first) or the previous piece."""
        (self.first_token if first else self.inter_token).observe(max(0.0, seconds))

    def request(self, route: str, status: int, seconds: float, code: str | None = None) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, code or f"http_{status}").inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

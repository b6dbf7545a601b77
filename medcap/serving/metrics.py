"""Prometheus metrics of one server (its own registry, so several servers can live in one
process, as in the tests): requests by endpoint and status, queue depth, rows per decode step,
generated tokens and their recent rate."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - re-exported for the app
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("medcap_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                                registry=r)  # fmt: skip
        self.queue_depth = Gauge("medcap_queue_depth", "requests waiting for a batch row", registry=r)
        self.running = Gauge("medcap_running_requests", "requests being decoded", registry=r)
        self.batch_size = Histogram("medcap_batch_size", "rows decoded together, per decode step", buckets=BATCH_BUCKETS,
                                    registry=r)  # fmt: skip
        self.prefill_size = Histogram("medcap_prefill_batch_size", "requests prefilled together when they join",
                                      buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.tokens = Counter("medcap_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_s = Gauge("medcap_generated_tokens_per_second",
                                  f"tokens generated per second over the last {RATE_WINDOW_S:.0f} s", registry=r)  # fmt: skip
        self.latency = Histogram("medcap_request_seconds", "chat requests: arrival to last token", buckets=LATENCY_BUCKETS,
                                 registry=r)  # fmt: skip
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def generated(self, count: int) -> None:
        """``count`` tokens were just generated (one decode step or prefill)."""
        if count <= 0:
            return
        self.tokens.inc(count)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, count))
            self._refresh(now)

    def _refresh(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        self.tokens_per_s.set(sum(n for _, n in self._recent) / RATE_WINDOW_S)

    def render(self) -> bytes:
        with self._lock:
            self._refresh(time.monotonic())
        return generate_latest(self.registry)

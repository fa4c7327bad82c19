"""Prometheus metrics (``apd_*``), per app instance, multi-process aware.

Each app gets its own :class:`~prometheus_client.CollectorRegistry`, so two apps in one
process (tests) count separately. With several uvicorn workers, ``apd serve`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start; prometheus-client
then keeps every worker's values in files there, and ``/metrics`` aggregates them all
(gauges: ``livesum``/``livemax`` over live workers).
"""

from __future__ import annotations

import os
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
DURATION_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
CACHE_TIERS: Final = ("memory", "redis")
ADMISSION_STAGES: Final = ("request",)
REDIS_ERROR_KINDS: Final = ("connection", "timeout", "response")

disable_created_metrics()  # no *_created series: they double the output and nobody reads them


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """Every metric the service exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "apd_requests_total",
            "HTTP requests by endpoint (route template), method and status code",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "apd_request_duration_seconds",
            "HTTP request duration by endpoint",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "apd_requests_in_flight",
            "HTTP requests being served",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inference_duration = Histogram(
            "apd_inference_duration_seconds",
            "Forward of the K networks and the uncertainty summary, per request",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.networks_sampled = Counter(
            "apd_posterior_networks_sampled_total",
            "Posterior networks evaluated to answer requests (K per request)",
            registry=r,
        )
        self.networks_generated = Counter(
            "apd_posterior_networks_generated_total",
            "Networks drawn from the generator (cache misses times the block size)",
            registry=r,
        )
        self.cache_hits = Counter(
            "apd_cache_hits_total",
            "Network blocks found in a cache tier: memory (in-process LRU) or redis",
            ["tier"],
            registry=r,
        )
        self.cache_misses = Counter(
            "apd_cache_misses_total",
            "Network blocks found in no cache and generated",
            registry=r,
        )
        self.cache_errors = Counter(
            "apd_cache_errors_total",
            "Failed Redis operations by kind: connection, timeout or response",
            ["kind"],
            registry=r,
        )
        self.cache_corrupt = Counter(
            "apd_cache_corrupt_entries_total",
            "Cached blocks that failed validation (header, length, checksum); deleted and redrawn",
            registry=r,
        )
        self.cache_degraded = Gauge(
            "apd_cache_degraded",
            "1 while the configured Redis is unreachable and the worker serves from memory",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.local_cache_bytes = Gauge(
            "apd_cache_local_bytes",
            "Bytes of network blocks held in the in-process LRU",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.admission_bytes = Gauge(
            "apd_admission_bytes",
            "Bytes of in-flight work admitted under the memory budget (bodies and forwards)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.admission_rejected = Counter(
            "apd_admission_rejected_total",
            "Requests answered 503 because the memory budget stayed full for admission_wait_s",
            ["stage"],
            registry=r,
        )
        self.anomaly_flags = Counter(
            "apd_anomaly_flags_total",
            "Inputs flagged as anomalous, by score",
            ["score"],
            registry=r,
        )
        self.model_info = Gauge(
            "apd_model_info",
            "The served checkpoint (value 1)",
            ["model_id", "version", "sha256", "backend"],
            registry=r,
            multiprocess_mode="livemax",
        )
        for tier in CACHE_TIERS:
            self.cache_hits.labels(tier=tier)
        for kind in REDIS_ERROR_KINDS:
            self.cache_errors.labels(kind=kind)
        for stage in ADMISSION_STAGES:
            self.admission_rejected.labels(stage=stage)

    def render(self) -> bytes:
        """The exposition text: this app's registry, or every worker's in multi-process mode."""
        if multiprocess_enabled():
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def mark_worker_exited(pid: int) -> None:
    """Drop a finished worker's live gauges (multi-process mode only)."""
    if multiprocess_enabled():
        prometheus_multiprocess.mark_process_dead(pid)

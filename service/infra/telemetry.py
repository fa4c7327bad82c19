"""Prometheus metrics (``apd_*``), per app instance, multi-process aware.

Each app gets its own :class:`~prometheus_client.CollectorRegistry`, so two apps in one
process (tests) count separately. With several uvicorn workers, ``apd serve`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start; prometheus-client
then keeps every worker's values in files there, and ``/metrics`` aggregates them all
(gauges: ``livesum``/``livemax`` over live workers).

Process metrics (``process_resident_memory_bytes``, ``process_cpu_seconds_total``,
``process_open_fds``, ...: prometheus-client's :class:`~prometheus_client.ProcessCollector`,
read from ``/proc``) describe the process itself with one worker. With several, each worker
and the supervising ``apd serve`` process note their pid in the multi-process directory
(:func:`register_process`), and ``/metrics`` reads every live one's ``/proc`` entry when it
is scraped, labelled ``pid`` and ``role`` (``worker`` or ``supervisor``): summed, they are
the memory and CPU of the whole server, which is what a container limit applies to.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
PROCESS_MARKER: Final = ".process"  # <role>_<pid>.process, beside prometheus-client's *.db
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
# Request and inference durations: 1 ms to 10 s in steps of 10^(1/10) (about 1.26: the R10
# preferred numbers of ISO 3), then 30 s. Measured, /predict takes 2.4-4 ms for one image and
# up to about 1 s for 256 images at K = 1000; across that range histogram_quantile's linear
# interpolation inside a bucket is off by under 10 % at p50 and p99
# (tests/test_ops_metrics.py), where the 1-2.5-5 buckets were off by up to 60 %.
R10: Final = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
DURATION_BUCKETS: Final = (
    *(round(m * 10.0**e, 6) for e in range(-3, 1) for m in R10),
    10.0,
    30.0,
)
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
        ProcessCollector(registry=r)  # this process (one worker; see render for several)
        register_process("worker")
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
            ["model", "version", "endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.networks_sampled = Counter(
            "apd_posterior_networks_sampled_total",
            "Posterior networks evaluated to answer requests (K per request)",
            ["model", "version"],
            registry=r,
        )
        self.networks_generated = Counter(
            "apd_posterior_networks_generated_total",
            "Networks drawn from the generator (cache misses times the block size)",
            registry=r,
        )
        self.nonfinite_answers = Counter(
            "apd_nonfinite_answers_total",
            "Requests whose computed answer held a NaN or infinite number: answered 500, "
            "never sent (a broken or diverged checkpoint)",
            ["model", "version", "endpoint"],
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
        self.admission_budget = Gauge(
            "apd_admission_budget_bytes",
            "The memory budget of in-flight work (memory_budget_mb), per worker",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.admission_rejected = Counter(
            "apd_admission_rejected_total",
            "Requests answered 503 by admission (Retry-After), by stage: body (a body arriving "
            "when the memory budget is full) or request (the budget stayed full for "
            "admission_wait_s, the request needs more than all of it, or the queue is full)",
            ["stage"],
            registry=r,
        )
        self.batch_queries = Histogram(
            "apd_batch_queries",
            "Queries answered by one forward of the dynamic batcher (unseeded requests)",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.requests_cancelled = Counter(
            "apd_requests_cancelled_total",
            "Requests stopped before their answer: the client disconnected, or the answer "
            "was not ready by the deadline",
            ["reason"],
            registry=r,
        )
        self.anomaly_flags = Counter(
            "apd_anomaly_flags_total",
            "Inputs flagged as anomalous, by model version and score",
            ["model", "version", "score"],
            registry=r,
        )
        self.model_info = Gauge(
            "apd_model_info",
            "Each served model version's checkpoint (value 1)",
            ["model", "version", "model_id", "checkpoint_version", "sha256", "backend"],
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
        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry, directory)
            registry.register(ServerProcessesCollector(directory))
            return generate_latest(registry)
        return generate_latest(self.registry)


def mark_worker_exited(pid: int) -> None:
    """Drop a finished worker's live gauges and process metrics (multi-process mode only)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        _forget_process(Path(directory, f"worker_{pid}{PROCESS_MARKER}"))


def _start_ticks(pid: int | str) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field
    22); None if there is no such process (or no ``/proc``). With the pid, it names one
    process: a pid reused later comes with a later start."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[-1].split()
    except OSError:
        return None
    return fields[19].decode() if len(fields) > 19 else None


def register_process(role: str) -> None:
    """In multi-process mode, note this process (``worker`` or ``supervisor``) in the
    directory, so that every worker's ``/metrics`` reports its process metrics."""
    directory = os.environ.get(MULTIPROC_ENV)
    ticks = _start_ticks("self")
    if not directory or ticks is None:
        return
    marker = Path(directory, f"{role}_{os.getpid()}{PROCESS_MARKER}")
    pending = marker.with_name(f".{marker.name}.tmp")
    pending.write_text(ticks)
    pending.replace(marker)  # whole or absent: a reader never sees it half written


def _forget_process(marker: Path) -> None:
    """Remove a process's marker and, for a worker, its live gauges' files."""
    role, _, pid = marker.name.removesuffix(PROCESS_MARKER).rpartition("_")
    marker.unlink(missing_ok=True)
    if role == "worker" and pid.isascii() and pid.isdigit():
        with suppress(FileNotFoundError):  # another worker's scrape removing them too
            prometheus_multiprocess.mark_process_dead(int(pid), str(marker.parent))


class ServerProcessesCollector(Collector):
    """Process metrics of every live process noted in a multi-process directory, labelled
    ``pid`` and ``role``, read when collected.

    A marker whose process has gone (a worker killed with no chance to clean up, by the
    kernel's OOM killer say) is removed, with that worker's live gauges, so that neither its
    last memory figure nor its in-flight gauges are counted any more.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for marker in sorted(self.directory.glob(f"*{PROCESS_MARKER}")):
            role, _, pid = marker.name.removesuffix(PROCESS_MARKER).rpartition("_")
            try:
                started = marker.read_text().strip()
            except OSError:  # removed meanwhile
                continue
            if not (pid.isascii() and pid.isdigit()) or _start_ticks(pid) != started:
                _forget_process(marker)
                continue
            for family in ProcessCollector(pid=partial(str, pid), registry=None).collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type)
                    families[family.name] = merged
                for s in family.samples:
                    merged.add_sample(s.name, {**s.labels, "pid": pid, "role": role}, s.value)
        return list(families.values())

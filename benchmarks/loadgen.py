"""Load generation against a live ``apd serve`` on loopback: request mix, clients, statistics.

Used by :mod:`benchmarks.load` and by ``tests/test_faults.py``. Request bodies are built once,
up front (random sparse 'stroke' images, pixels rounded to 3 decimals), so the clients spend
their CPU on HTTP rather than on JSON encoding. Every loop stops by itself: at a deadline or
after a request count, whichever comes first.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

ENDPOINTS = ("/predict", "/anomaly-score")
SCORES = ("mutual_information", "predictive_entropy", "model_variance", "max_probability")


def images(n: int, rng: np.random.Generator) -> list[list[float]]:
    """``n`` MNIST-like images: mostly black, with bright sparse strokes, 3 decimals."""
    x = rng.random((n, 784))
    x *= rng.random((n, 784)) < 0.2
    return np.round(x, 3).tolist()


@dataclass(frozen=True)
class RequestSpec:
    endpoint: str
    batch: int
    seed: int | None
    num_samples: int | None
    body: bytes


def build_requests(
    count: int,
    *,
    seeds: Sequence[int],
    num_samples: Sequence[int | None],
    max_batch: int = 64,
    min_batch: int = 1,
    seeded_fraction: float = 0.75,
    rng_seed: int = 0,
) -> list[RequestSpec]:
    """``count`` distinct request bodies: /predict and /anomaly-score alternating, batch
    sizes uniform in min_batch..max_batch, seeds from ``seeds`` (or none: the pool), K from
    ``num_samples``."""
    rng = np.random.default_rng(rng_seed)
    pool = images(max_batch * 4, rng)
    out: list[RequestSpec] = []
    for i in range(count):
        endpoint = ENDPOINTS[i % 2]
        batch = int(rng.integers(min_batch, max_batch + 1))
        start = int(rng.integers(0, len(pool) - batch + 1))
        seed = int(rng.choice(seeds)) if rng.random() < seeded_fraction else None
        k = num_samples[int(rng.integers(0, len(num_samples)))]
        payload: dict[str, Any] = {"inputs": pool[start : start + batch]}
        if seed is not None:
            payload["seed"] = seed
        if k is not None:
            payload["num_samples"] = k
        if endpoint == "/anomaly-score" and rng.random() < 0.5:
            payload["score"] = SCORES[int(rng.integers(0, len(SCORES)))]
        out.append(RequestSpec(endpoint, batch, seed, k, json.dumps(payload).encode()))
    return out


@dataclass
class Sample:
    t: float  # seconds since the run started, at send
    endpoint: str
    batch: int
    status: int  # 0: no response (connection error or timeout)
    latency_s: float
    error: str = ""


@dataclass
class RunResult:
    samples: list[Sample] = field(default_factory=list)
    started: float = 0.0
    wall_s: float = 0.0

    def failed(self) -> list[Sample]:
        return [s for s in self.samples if s.status != 200]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values), q))


def summarize(samples: Sequence[Sample], wall_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.status == 200]
    lat = [s.latency_s for s in ok]
    images_done = sum(s.batch for s in ok)
    errors: dict[str, int] = {}
    for s in samples:
        if s.status != 200:
            key = str(s.status) if s.status else (s.error or "no response")
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "error_kinds": errors,
        "wall_s": round(wall_s, 3),
        "throughput_rps": round(len(ok) / wall_s, 2) if wall_s > 0 else None,
        "throughput_images_per_s": round(images_done / wall_s, 1) if wall_s > 0 else None,
        "latency_ms": {
            "p50": round(1e3 * percentile(lat, 50), 2),
            "p95": round(1e3 * percentile(lat, 95), 2),
            "p99": round(1e3 * percentile(lat, 99), 2),
            "max": round(1e3 * max(lat), 2) if lat else None,
            "mean": round(1e3 * float(np.mean(lat)), 2) if lat else None,
        },
        "by_endpoint": {
            ep: _endpoint_stats([s for s in ok if s.endpoint == ep]) for ep in ENDPOINTS
        },
    }


def _endpoint_stats(ok: Sequence[Sample]) -> dict[str, Any]:
    lat = [s.latency_s for s in ok]
    return {
        "ok": len(ok),
        "p50_ms": round(1e3 * percentile(lat, 50), 2),
        "p99_ms": round(1e3 * percentile(lat, 99), 2),
    }


async def run_clients(
    base_url: str,
    requests: Sequence[RequestSpec],
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    request_timeout_s: float = 30.0,
    rng_seed: int = 1,
) -> RunResult:
    """``concurrency`` clients sending random picks from ``requests`` until ``duration_s``
    has passed or ``max_requests`` were sent. Each client waits for its answer before the
    next request (closed loop), so the offered load follows the service's speed."""
    result = RunResult(started=time.monotonic())
    deadline = result.started + duration_s
    sent = 0
    rng = np.random.default_rng(rng_seed)
    order = rng.integers(0, len(requests), size=max_requests)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(request_timeout_s, connect=5.0)
    headers = {"content-type": "application/json"}

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:

        async def one_client() -> None:
            nonlocal sent
            while sent < max_requests and time.monotonic() < deadline:
                spec = requests[int(order[sent])]
                sent += 1
                t0 = time.monotonic()
                status, err = 0, ""
                try:
                    r = await client.post(spec.endpoint, content=spec.body, headers=headers)
                    status = r.status_code
                    if status != 200:
                        err = r.text[:200]
                except httpx.HTTPError as exc:
                    err = type(exc).__name__
                t1 = time.monotonic()
                result.samples.append(
                    Sample(t0 - result.started, spec.endpoint, spec.batch, status, t1 - t0, err)
                )

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    result.wall_s = time.monotonic() - result.started
    return result


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments dropped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def metric_sum(metrics: dict[str, float], prefix: str, **labels: str) -> float:
    """Sum of every sample whose name starts with ``prefix`` and has the given labels."""
    total = 0.0
    for key, value in metrics.items():
        name = key.split("{", 1)[0]
        if name != prefix:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total

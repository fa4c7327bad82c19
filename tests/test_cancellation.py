"""Cancellation: a client that disconnects, or a request past its deadline, stops its
computation at the next chunk and gives its memory reservation back (issue #23)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import LOOPBACK, apd_serve
from tests.service_support import make_checkpoint

pytestmark = pytest.mark.slow

# Wide enough that K = 1000 over 64 inputs takes a second on a shared 2-core box; a faster
# CPU gets more inputs (heavy_rows), up to MAX_ROWS, which the servers here admit.
SLOW = {"sizes": (784, 1024, 10), "hidden": (64,), "rank": 32}
MAX_ROWS = 1024
ENV = {"APD_MAX_BATCH": str(MAX_ROWS), "APD_MAX_BODY_BYTES": str(64 << 20),
       "APD_MEMORY_BUDGET_MB": "2048"}  # fmt: skip
ONE_SLOT = ["--compute-concurrency", "1", "--batch-max-rows", "1", "--num-threads", "1"]


@pytest.fixture(scope="module")
def slow_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("slow") / "model.safetensors", **SLOW)


@pytest.fixture(scope="module")
def heavy_rows(slow_ckpt: Path) -> int:
    """Inputs of a K = 1000 request that keep this machine's server busy for 0.6 s or more
    (its networks cached): what the tests cancel has to run long enough to be cut short."""
    with apd_serve(slow_ckpt, args=ONE_SLOT, env=ENV) as server:
        timed_predict(server.base_url, body(1, 1000, seed=3))  # draws and caches the networks
        n = 64
        while timed_predict(server.base_url, body(n, 1000, seed=3)) < 0.6 and n < MAX_ROWS:
            n *= 2
    return n


def metric(base: str, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(base + "/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                total += s.value
    return total


def body(n: int, k: int, seed: int | None = None) -> bytes:
    x = np.random.default_rng(0).random((n, 784)).round(3)
    request: dict[str, Any] = {"inputs": x.tolist(), "num_samples": k}
    if seed is not None:
        request["seed"] = seed
    return json.dumps(request).encode()


def timed_predict(base: str, payload: bytes) -> float:
    t0 = time.perf_counter()
    r = httpx.post(base + "/predict", content=payload, timeout=120,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def test_a_client_that_disconnects_stops_its_computation_and_frees_its_budget(
    slow_ckpt: Path, heavy_rows: int
) -> None:
    with apd_serve(slow_ckpt, args=ONE_SLOT, env=ENV) as server:
        base = server.base_url
        heavy = body(heavy_rows, 1000, seed=3)
        alone = timed_predict(base, heavy)  # warm: the seed's networks are cached now
        assert alone > 0.3, f"the heavy request must take a while to test anything ({alone} s)"
        # Send it again, and leave before the answer.
        sock = socket.create_connection((LOOPBACK, server.port))
        head = (
            f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(heavy)}\r\n\r\n"
        )
        sock.sendall(head.encode() + heavy)
        time.sleep(min(0.2, alone / 4))
        sock.close()
        t0 = time.perf_counter()
        deadline = t0 + 10
        while metric(base, "apd_requests_cancelled_total", {"reason": "disconnect"}) < 1:
            assert time.perf_counter() < deadline, server.log()[-2000:]
            time.sleep(0.02)
        while metric(base, "apd_admission_bytes") > 0:
            assert time.perf_counter() < deadline, "the reservation was not released"
            time.sleep(0.02)
        # The single compute slot is free long before the abandoned forward would have ended.
        small = timed_predict(base, body(1, 10, seed=1))
        assert time.perf_counter() - t0 < alone * 0.75, (time.perf_counter() - t0, alone)
        assert small < alone


def test_a_request_past_its_deadline_is_a_504_and_stops(slow_ckpt: Path, heavy_rows: int) -> None:
    args = [*ONE_SLOT, "--request-timeout-s", "0.2"]
    with apd_serve(slow_ckpt, args=args, env=ENV) as server:
        base = server.base_url
        t0 = time.perf_counter()
        r = httpx.post(base + "/predict", content=body(heavy_rows, 1000), timeout=60,
                       headers={"content-type": "application/json"})  # fmt: skip
        took = time.perf_counter() - t0
        assert r.status_code == 504, r.text
        assert "deadline" in r.json()["message"]
        assert took < 2.0, took
        assert metric(base, "apd_requests_cancelled_total", {"reason": "deadline"}) == 1
        assert metric(base, "apd_admission_bytes") == 0
        ok = httpx.post(base + "/predict", content=body(1, 10), timeout=30,
                        headers={"content-type": "application/json"})  # fmt: skip
        assert ok.status_code == 200

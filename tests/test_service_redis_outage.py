"""Redis going away under a running service: it keeps answering, says it is degraded, and
goes back to Redis when Redis returns. Uses a private redis-server on a free port."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from apd.checkpoint import load_checkpoint
from service.api.app import create_app
from service.config import Settings
from tests.service_support import free_port, make_checkpoint, make_client, random_images

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


class PrivateRedis:
    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=self.port, socket_timeout=0.2).ping():
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def keys(self) -> list[str]:
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            return [k.decode() for k in client.scan_iter(match="*:codes:*")]
        finally:
            client.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.resume()
        server.kill()


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def degraded_gauge(client: Any) -> float:
    value = client.app.state.metrics.registry.get_sample_value("apd_cache_degraded")
    return float(value)


def test_service_survives_redis_going_away_and_coming_back(
    tmp_path: Path, private_redis: PrivateRedis
) -> None:
    ckpt_path = make_checkpoint(tmp_path / "model.safetensors")
    sha = load_checkpoint(ckpt_path).sha256
    settings = Settings(
        checkpoint=ckpt_path,
        redis_url=private_redis.url,
        cache_hmac_key="outage-test-hmac-key-0123",
        redis_key_prefix="outage",
        pool_size=20,
        num_threads=1,
        redis_socket_timeout_s=0.2,
        redis_probe_s=0.1,
    )
    x = random_images(2, seed=12).tolist()

    def predict(seed: int) -> tuple[dict[str, Any], float]:
        t0 = time.monotonic()
        response = client.post("/predict", json={"inputs": x, "num_samples": 20, "seed": seed})
        assert response.status_code == 200, response.text
        return response.json(), time.monotonic() - t0

    def redis_state() -> str:
        body = client.get("/readyz")
        assert body.status_code == 200  # degraded, never unready
        return str(body.json()["redis"])

    with make_client(create_app(settings)) as client:
        assert redis_state() == "ok" and degraded_gauge(client) == 0
        before, _ = predict(1)
        assert f"outage:codes:test-fcnn/1:{sha}:seed-1:1" in private_redis.keys()

        # 1. Redis dies: requests keep being answered, quickly, from memory and the generator.
        private_redis.kill()
        during = [predict(seed) for seed in (1, 2, 3)]
        assert during[0][0] == before  # seed 1 from the in-process cache
        assert all(elapsed < 1.5 for _, elapsed in during), [e for _, e in during]
        assert wait_until(lambda: redis_state() == "degraded", 2)
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["cache"] == "redis" and ready["degraded"]
        assert degraded_gauge(client) == 1
        errors = client.app.state.metrics.registry.get_sample_value(
            "apd_cache_errors_total", {"kind": "connection"}
        )
        assert errors >= 1
        _, elapsed = predict(4)  # while degraded, Redis is not even tried
        assert elapsed < 1.0

        # 2. Redis returns (empty): the service notices and writes to it again.
        private_redis.start()
        assert wait_until(lambda: redis_state() == "ok", 5), "did not go back to Redis"
        assert degraded_gauge(client) == 0
        after, _ = predict(5)
        assert f"outage:codes:test-fcnn/1:{sha}:seed-5:1" in private_redis.keys()
        assert predict(2)[0] == during[1][0]  # same seed, same numbers, outage or not

        # 3. Redis hangs (stopped, not dead): socket timeouts, not waits without end.
        private_redis.pause()
        try:
            _, elapsed = predict(6)
            assert elapsed < 2.0, elapsed
            assert wait_until(lambda: redis_state() == "degraded", 3)
            _, elapsed = predict(7)
            assert elapsed < 1.0
        finally:
            private_redis.resume()
        assert wait_until(lambda: redis_state() == "ok", 5)
        timeouts = client.app.state.metrics.registry.get_sample_value(
            "apd_cache_errors_total", {"kind": "timeout"}
        )
        assert timeouts >= 1
    assert after["num_samples"] == 20


def test_unreachable_redis_at_startup_is_degraded_not_fatal(tmp_path: Path) -> None:
    ckpt_path = make_checkpoint(tmp_path / "model.safetensors")
    settings = Settings(
        checkpoint=ckpt_path,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        cache_hmac_key="outage-test-hmac-key-0123",
        pool_size=10,
        num_threads=1,
        redis_socket_timeout_s=0.2,
    )
    with make_client(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() | {"checkpoint_sha256": None} == {
            "status": "ready",
            "cache": "redis",
            "redis": "degraded",
            "degraded": True,
            "pool_networks": 10,
            "checkpoint_sha256": None,
        }
        response = client.post("/predict", json={"inputs": [[0.2] * 784], "seed": 1})
        assert response.status_code == 200

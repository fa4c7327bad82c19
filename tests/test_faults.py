"""Cache faults against a live ``apd serve`` and a private ``redis-server``, CI-sized.

* Corrupted or forged cache entries (truncated, bit-flipped in the header, the codes or the
  MAC, emptied, forged with another key, another checkpoint's entry or another stream's entry
  under our key) are each
  detected (``apd_cache_corrupt_entries_total``), redrawn and rewritten, and never served:
  the answer with the same seed equals the one before the corruption.
* Redis stopped under load and restarted: no request fails, ``/readyz`` says ``degraded``
  (still HTTP 200) while it is down and ``ok`` after, and the service stores and reads
  blocks in Redis again.

The server runs with ``--local-cache-mb 0`` so that every seeded block is read from Redis.
``benchmarks/load.py`` runs the same faults at scale, with 2 workers, for 60 s or more.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.harness import (
    ROOT,
    TEST_HMAC_KEY,
    RedisServer,
    ServeProcess,
    apd_serve,
    make_tiny_checkpoint,
)

sys.path.insert(0, str(ROOT / "benchmarks"))
from loadgen import build_requests, images, metric_sum, parse_metrics, run_clients

from service.core.networks import Stream
from service.infra.cache import HEADER_BYTES, MAC_BYTES, BlockLayout, encode_block

K = 20  # two blocks of 10 networks per seed
CORRUPT = "apd_cache_corrupt_entries_total"


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def service(redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("faults") / "tiny.safetensors")
    args = [
        "--workers", "1",
        "--redis-url", redis.url,
        "--local-cache-mb", "0",
        "--pool-size", "10",
        "--redis-probe-s", "0.1",
        "--log-level", "warning",
    ]  # fmt: skip
    with apd_serve(ckpt, args=args, timeout=90) as srv:
        yield srv


def _metrics(srv: ServeProcess) -> dict[str, float]:
    return parse_metrics(httpx.get(srv.base_url + "/metrics", timeout=10).text)


def _predict(client: httpx.Client, seed: int, x: list[list[float]]) -> dict[str, object]:
    r = client.post("/predict", json={"inputs": x, "seed": seed, "num_samples": K})
    assert r.status_code == 200, r.text
    body = r.json()
    return {"num_samples": body["num_samples"], "predictions": body["predictions"]}


def _entries(rc: object, sha: str, seed: int) -> dict[str, bytes]:
    keys = sorted(rc.scan_iter(match=f"*:codes:*:{sha}:seed-{seed}:*", count=1000))  # type: ignore[attr-defined]
    return {k.decode(): rc.get(k) for k in keys}  # type: ignore[attr-defined]


def _flip(value: bytes, pos: int, bit: int = 0) -> bytes:
    b = bytearray(value)
    b[pos] ^= 1 << bit
    return bytes(b)


def _foreign_entry(key: str, value: bytes, sha: str, *, how: str) -> bytes:
    """A well-formed entry for the same block that is not ours to serve: forged without the
    key, another checkpoint's (same shape, other sha256), or ours for another stream."""
    stream_name, block = key.rsplit(":", 2)[-2:]
    code_dim = (len(value) - HEADER_BYTES - MAC_BYTES) // (10 * 4)
    codes = np.random.default_rng(0).standard_normal((10, code_dim)).astype(np.float32)
    stream = Stream(stream_name, int(stream_name.split("-", 1)[1]))
    key_bytes = TEST_HMAC_KEY.encode()
    if how == "forged":
        layout = BlockLayout(sha, code_dim, b"an attacker's key, not ours")
    elif how == "other-checkpoint":
        layout = BlockLayout("ab" * 32, code_dim, key_bytes)
    else:
        layout = BlockLayout(sha, code_dim, key_bytes)
        stream = Stream.for_seed(int(stream_name.split("-", 1)[1]) + 1)
    return encode_block(layout, stream.name, int(block), codes)


CORRUPTIONS = {
    "truncated-half": lambda key, v, sha: v[: len(v) // 2],
    "truncated-last-byte": lambda key, v, sha: v[:-1],
    "empty": lambda key, v, sha: b"",
    "flipped-header": lambda key, v, sha: _flip(v, 20, 3),  # inside the checkpoint sha256
    "flipped-codes": lambda key, v, sha: _flip(v, len(v) // 2, 5),
    "flipped-mac": lambda key, v, sha: _flip(v, len(v) - 1, 0),
    "forged": lambda key, v, sha: _foreign_entry(key, v, sha, how="forged"),
    "foreign-checkpoint": lambda key, v, sha: _foreign_entry(key, v, sha, how="other-checkpoint"),
    "other-stream": lambda key, v, sha: _foreign_entry(key, v, sha, how="other-stream"),
}


def test_corrupt_entries_are_detected_redrawn_never_served(
    service: ServeProcess, redis: RedisServer
) -> None:
    rc = redis.client()
    x = images(3, np.random.default_rng(2))
    with httpx.Client(base_url=service.base_url, timeout=30) as c:
        sha = c.get("/v1/model").json()["sha256"]
        for i, (name, corrupt) in enumerate(CORRUPTIONS.items()):
            seed = 9000 + i
            clean = _predict(c, seed, x)  # drawn and stored in Redis
            good = _entries(rc, sha, seed)
            assert len(good) == 2, f"expected 2 cached blocks for seed {seed}, found {list(good)}"
            before = metric_sum(_metrics(service), CORRUPT)
            for key, value in good.items():
                bad = corrupt(key, value, sha)
                assert bad != value
                rc.set(key, bad)
            answer = _predict(c, seed, x)
            assert answer == clean, f"{name}: a corrupted entry changed the answer"
            counted = metric_sum(_metrics(service), CORRUPT) - before
            assert counted == len(good), f"{name}: {counted} of {len(good)} corruptions counted"
            redrawn = _entries(rc, sha, seed)
            assert redrawn == good, f"{name}: the entries were not redrawn and rewritten"


def test_redis_stop_and_restart_under_load(service: ServeProcess, redis: RedisServer) -> None:
    seeds = list(range(100, 106))
    reqs = build_requests(24, seeds=seeds, num_samples=[10, 20], max_batch=16, rng_seed=4)
    readyz: list[tuple[float, int, str]] = []

    async def poll_readyz(t0: float, until: float) -> None:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=2) as c:
            for _ in range(1000):
                if time.monotonic() > until:
                    return
                try:
                    r = await c.get("/readyz")
                    readyz.append((time.monotonic() - t0, r.status_code, r.json().get("redis")))
                except httpx.HTTPError as exc:
                    readyz.append((time.monotonic() - t0, 0, type(exc).__name__))
                await asyncio.sleep(0.1)

    async def chaos(t0: float) -> dict[str, float]:
        await asyncio.sleep(2.0)
        stopped = time.monotonic() - t0  # from the moment the stop begins
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(2.5)
        await asyncio.to_thread(redis.start)
        return {"stopped": stopped, "restarted": time.monotonic() - t0}

    async def scenario() -> tuple[object, dict[str, float]]:
        t0 = time.monotonic()
        load = run_clients(service.base_url, reqs, concurrency=3, duration_s=8.0, max_requests=2000)
        results = await asyncio.gather(load, chaos(t0), poll_readyz(t0, t0 + 9.5))
        return results[0], results[1]

    result, times = asyncio.run(scenario())
    failed = result.failed()  # type: ignore[attr-defined]
    samples = result.samples  # type: ignore[attr-defined]
    assert len(samples) >= 20, f"too little load: {len(samples)} requests"
    assert not failed, f"{len(failed)} failed requests, e.g. {failed[:3]}"
    during = [s for s in samples if times["stopped"] + 0.2 < s.t < times["restarted"]]
    assert during, "no request was served while Redis was down"

    assert {st for _, st, _ in readyz} == {200}, "readyz must stay 200 (degraded, not unready)"
    down = [t for t, _, state in readyz if state == "degraded"]
    assert down, f"readyz never said degraded: {readyz}"
    assert times["stopped"] <= min(down) < times["restarted"] + 0.5
    back = [t for t, _, state in readyz if state == "ok" and t > times["restarted"]]
    assert back, f"readyz did not return to ok after the restart: {readyz[-5:]}"
    assert min(back) - times["restarted"] < 3.0

    # Redis is used again: fresh (empty) server gets blocks written, then read back
    x = images(2, np.random.default_rng(8))
    with httpx.Client(base_url=service.base_url, timeout=30) as c:
        first = _predict(c, 4242, x)
        second = _predict(c, 4242, x)
    assert first == second
    info = redis.client().info("stats")
    assert redis.client().dbsize() > 0, "nothing was written to Redis after its restart"
    assert int(info["keyspace_hits"]) > 0, "Redis was not read after its restart"


def test_service_answered_throughout(service: ServeProcess) -> None:
    """After both fault tests the process is the one we started and it is healthy."""
    assert service.proc.poll() is None
    assert httpx.get(service.base_url + "/healthz", timeout=5).status_code == 200

"""Admission (service/infra/admission.py): the budget's queue and its bounds, the scan that bounds a
body's parse cost before it is parsed, and a live worker under concurrent worst-case requests
that answers each one 200 or 503 with Retry-After, drops none, and keeps its memory bounded."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.infra.admission import JsonShape, MemoryBudget, Overloaded, ParseLimits
from service.infra.telemetry import Metrics
from tests.harness import apd_serve, make_tiny_checkpoint, rss_bytes


def budget(
    capacity: int, wait_s: float = 0.2, queue: int = 64, per_client: int = 64
) -> MemoryBudget:
    return MemoryBudget(capacity, wait_s, Metrics(), queue, per_client)


def test_reservations_within_the_budget_pass_and_release() -> None:
    async def run() -> None:
        b = budget(100)
        await b.acquire(60, "request")
        await b.acquire(40, "request")
        assert b.used == 100
        b.release(60)
        b.release(40)
        assert b.used == 0

    asyncio.run(run())


def test_waiters_are_served_in_arrival_order_when_memory_frees() -> None:
    async def run() -> list[str]:
        b = budget(100, wait_s=5)
        await b.acquire(90, "request")
        order: list[str] = []

        async def take(name: str, n: int) -> None:
            await b.acquire(n, "request")
            order.append(name)

        big = asyncio.create_task(take("big", 80))
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 5))  # would fit now, but must queue behind
        await asyncio.sleep(0.05)
        assert order == [] and b.used == 90
        b.release(90)
        await asyncio.gather(big, small)
        assert b.used == 85
        return order

    assert asyncio.run(run()) == ["big", "small"]


def test_a_wait_past_the_limit_is_503_with_retry_after_and_frees_its_place() -> None:
    async def run() -> None:
        b = budget(100, wait_s=0.05)
        await b.acquire(100, "request")
        with pytest.raises(Overloaded) as info:
            await b.acquire(10, "request")
        assert info.value.status_code == 503 and info.value.headers == {"Retry-After": "1"}
        assert b._metrics.registry.get_sample_value(
            "apd_admission_rejected_total", {"stage": "request"}
        )
        b.release(100)
        await b.acquire(100, "request")  # the timed-out waiter holds nothing

    asyncio.run(run())


def test_more_than_the_whole_budget_is_refused_at_once() -> None:
    async def run() -> None:
        b = budget(100, wait_s=10)
        with pytest.raises(Overloaded, match="whole budget"):
            await b.acquire(101, "request")
        assert b.used == 0

    asyncio.run(run())


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def run() -> None:
        b = budget(100, wait_s=10)
        await b.acquire(100, "request")
        task = asyncio.create_task(b.acquire(50, "request"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        b.release(100)
        assert b.used == 0 and not b._waiters

    asyncio.run(run())


def test_received_bytes_are_held_at_once_or_refused_at_once() -> None:
    b = budget(100)
    b.hold(60)
    with pytest.raises(Overloaded) as info:
        b.hold(41)
    assert info.value.status_code == 503 and b.used == 60
    b.release(60)
    assert b.used == 0


def test_the_queue_sheds_the_newest_past_its_bound_and_past_a_clients_share() -> None:
    async def run() -> None:
        b = budget(100, wait_s=5, queue=3, per_client=2)
        await b.acquire(100, "request")
        waiting = [asyncio.create_task(b.acquire(10, "request", "a")) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="this client has 2 requests queued"):
            await b.acquire(10, "request", "a")  # a's third: shed at once
        other = asyncio.create_task(b.acquire(10, "request", "b"))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="3 requests are queued"):
            await b.acquire(10, "request", "c")  # the queue is full: shed at once
        b.release(100)
        await asyncio.gather(*waiting, other)  # the queued ones are served, in order
        assert b.used == 30 and not b._waiters and not b._queued_by_client

    asyncio.run(run())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=30,
)


def _made(value: object) -> tuple[int, int, int]:
    """Containers, keys and values (containers included) that parsing ``value`` makes."""
    if isinstance(value, list):
        parts = [_made(v) for v in value]
        return (1 + sum(p[0] for p in parts), sum(p[1] for p in parts),
                1 + sum(p[2] for p in parts))  # fmt: skip
    if isinstance(value, dict):
        parts = [_made(v) for v in value.values()]
        return (1 + sum(p[0] for p in parts), len(value) + sum(p[1] for p in parts),
                1 + sum(p[2] for p in parts))  # fmt: skip
    return 0, 0, 1


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans())
def test_the_scan_bounds_what_parsing_makes_whatever_the_body(value: object, ascii: bool) -> None:
    import json

    text = json.dumps(value, ensure_ascii=ascii).encode()
    found = JsonShape.scan(text)
    containers, keys, values = _made(json.loads(text))
    assert found.containers >= containers and found.keys >= keys and found.values >= values


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{" + b",".join(b'"%d":0' % i for i in range(100_000)) + b"}", "JSON values"),
        (b'{"inputs":[' + b",".join([b"[]"] * 100_000) + b"]}", "JSON values"),
        (b'{"inputs":' + b"[" * 50_000 + b"]" * 50_000 + b"}", "JSON values"),
        (b"{" + b",".join(b'"k%d":{}' % i for i in range(300)) + b"}", "object keys"),
    ],
    ids=["keys", "empty lists", "deep", "many keys"],
)
def test_bodies_past_what_a_request_holds_are_refused_unparsed(body: bytes, words: str) -> None:
    limits = ParseLimits.of((28, 28), max_batch=8)
    refusal = limits.refusal(JsonShape.scan(body))
    assert refusal is not None and words in refusal and "at most" in refusal


def test_a_valid_batch_of_max_batch_nested_examples_is_within_the_limits() -> None:
    import json

    x = np.random.default_rng(0).random((8, 28, 28)).round(3).tolist()
    body = json.dumps({"inputs": x, "num_samples": 10, "seed": 1}).encode()
    limits = ParseLimits.of((28, 28), max_batch=8)
    assert limits.refusal(JsonShape.scan(body)) is None
    v2 = {"inputs": [{"name": "input", "shape": [8, 28, 28], "datatype": "FP32", "data": x}],
          "outputs": [{"name": n, "parameters": {"binary_data": False}} for n in "abcdefgh"],
          "parameters": {"num_samples": 10, "seed": 1, "score": "mutual_information"}}  # fmt: skip
    assert limits.refusal(JsonShape.scan(json.dumps(v2).encode())) is None


def _body(n: int, k: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 784)).round(4).tolist()
    import json

    return json.dumps({"inputs": x, "num_samples": k, "seed": seed}).encode()


def test_concurrent_worst_case_requests_queue_or_get_503_and_memory_stays_bounded(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """16 concurrent requests of 256 images x K 1000 with fresh seeds against one worker
    whose budget admits about two at a time: every request is answered (200, or 503 with
    Retry-After), none is dropped, and the worker's RSS stays within budget plus its base.
    (Admitting parts of bodies would deadlock here: every request would hold a share of the
    budget and wait for the rest until the body timeout.)"""
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("admission") / "tiny.safetensors")
    bodies = [_body(256, 1000, 100 + i) for i in range(16)]
    found = JsonShape.scan(bodies[0])
    need = len(bodies[0]) + ParseLimits.parse_bytes(found, len(bodies[0])) + (16 << 20)
    budget_mb = 2.5 * need / 2**20
    args = ["--workers", "1", "--memory-budget-mb", f"{budget_mb:.1f}", "--admission-wait-s",
            "30", "--max-body-bytes", str(8 << 20), "--log-level", "warning"]  # fmt: skip
    with apd_serve(ckpt, args=args, timeout=90) as srv:
        pid = srv.worker_pids()[0]
        base_rss = rss_bytes(pid)
        peak = [base_rss]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_bytes(pid))
                stop.wait(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()

        async def send_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            "/predict", content=b, headers={"content-type": "application/json"}
                        )
                        for b in bodies
                    )
                )

        try:
            responses = asyncio.run(send_all())
        finally:
            stop.set()
            watcher.join()
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 2, statuses
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1 and "budget" in r.json()["message"]
            else:
                assert len(r.json()["predictions"]) == 256
        metrics = httpx.get(srv.base_url + "/metrics", timeout=10).text
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("apd_admission_rejected_total{")
        )
        assert counted == statuses.count(503)
        # Within the budget plus a margin for the interpreter's own allocations.
        assert peak[0] - base_rss < (budget_mb + 96) * 2**20, (base_rss, peak[0])

"""Request limits of a live ``apd serve`` on loopback, probed over raw sockets.

* A body over ``max_body_bytes`` gets 413 from its ``Content-Length`` alone: the answer
  arrives while almost none of the announced body has been sent. A chunked body (no length)
  is cut off with 413 once it passes the limit, not read to its end.
* More images than ``max_batch`` get 413 naming the batch limit.
* A client that sends part of a body and stalls gets 408 after ``body_timeout_s``.
* An idle keep-alive connection is closed after ``timeout_keep_alive_s``.
* Many slow clients at once (stalled bodies, headers trickled byte by byte) do not stop the
  worker from answering others promptly.
* Oversized request headers are refused with a 4xx (or the connection closed), never a 5xx.

The limits are documented in ``docs/limits.md``. One server (1 worker, small limits) serves
the whole module; every socket has a timeout and every loop a bound.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import LOOPBACK, ServeProcess, apd_serve, make_tiny_checkpoint, rss_bytes

MAX_BODY = 256 * 1024
MAX_BATCH = 8
BODY_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 2

pytestmark = pytest.mark.skipif(
    not (Path(__file__).resolve().parents[1] / "service" / "cli.py").is_file(),
    reason="service/cli.py not written yet",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("limits") / "tiny.safetensors")
    args = [
        "--workers", "1",
        "--max-body-bytes", str(MAX_BODY),
        "--max-batch", str(MAX_BATCH),
        "--body-timeout-s", str(BODY_TIMEOUT_S),
        "--timeout-keep-alive-s", str(KEEP_ALIVE_S),
        "--pool-size", "10",
        "--log-level", "warning",
    ]  # fmt: skip
    from service.config import Settings

    if "header_timeout_s" in Settings.model_fields:  # the slowloris fix, once it exists
        args += ["--header-timeout-s", str(BODY_TIMEOUT_S)]
    with apd_serve(ckpt, args=args, env={"APD_REDIS_URL": ""}, timeout=90) as srv:
        yield srv


def _connect(server: ServeProcess, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((LOOPBACK, server.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_response(s: socket.socket, limit: int = 1 << 20) -> bytes:
    """Read until the peer closes, the headers and a Content-Length body are in, or timeout."""
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        for _ in range(10_000):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    None,
                )
                if length is not None and len(body) >= length:
                    break
            if len(data) > limit:
                break
    return data


def _status(response: bytes) -> int:
    line = response.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else 0


def _body_json(response: bytes) -> dict[str, object]:
    return json.loads(response.partition(b"\r\n\r\n")[2] or b"{}")


def _healthy(server: ServeProcess) -> None:
    r = httpx.get(server.base_url + "/healthz", timeout=5)
    assert r.status_code == 200


def _image_batch(n: int) -> dict[str, object]:
    return {"inputs": [[0.0] * 784 for _ in range(n)], "seed": 1}


def test_declared_oversized_body_gets_413_before_it_is_sent(server: ServeProcess) -> None:
    """Announce 1 GB, send 20 bytes: the 413 must come back without waiting for the rest."""
    with _connect(server, timeout=5.0) as s:
        head = (
            "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {1 << 30}\r\n\r\n"
        ).encode()
        t0 = time.monotonic()
        s.sendall(head + b'{"inputs": [[0.0, 0.')
        response = _read_response(s)
        elapsed = time.monotonic() - t0
    assert _status(response) == 413, response[:300]
    assert elapsed < BODY_TIMEOUT_S, f"413 took {elapsed:.2f} s: the body was waited for"
    _healthy(server)


def test_body_413_is_json_naming_the_limit(server: ServeProcess) -> None:
    """API.md: a client mistake gets a message that names what was wrong (here, the limit)."""
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        r = c.post("/predict", content=b"[" + b"0," * MAX_BODY + b"0]")
    assert r.status_code == 413
    assert r.headers.get("content-type", "").startswith("application/json"), r.text[:200]
    assert str(MAX_BODY) in r.json()["detail"], r.text[:200]


def test_streamed_body_over_limit_is_cut_off(server: ServeProcess) -> None:
    """Chunked, no Content-Length: twice the limit is sent and the body never finished.

    A server that read bodies to their end would wait for the last chunk (and answer 408
    after body_timeout_s); one that counts bytes answers 413 as soon as it passes the limit.
    """
    with _connect(server, timeout=5.0) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"0" * 16384
        framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        t0 = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(2 * MAX_BODY // len(chunk)):
                s.sendall(framed)
        s.settimeout(BODY_TIMEOUT_S / 2)
        response = _read_response(s)
        elapsed = time.monotonic() - t0
    assert _status(response) == 413, response[:300]
    assert elapsed < BODY_TIMEOUT_S, f"413 after {elapsed:.2f} s"
    _healthy(server)


def test_batch_over_limit_gets_413_naming_the_limit(server: ServeProcess) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        ok = c.post("/predict", json=_image_batch(MAX_BATCH))
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["predictions"]) == MAX_BATCH
        for endpoint in ("/predict", "/anomaly-score"):
            r = c.post(endpoint, json=_image_batch(MAX_BATCH + 1))
            assert r.status_code == 413, r.text
            detail = json.dumps(r.json())
            assert str(MAX_BATCH) in detail and "batch" in detail.lower(), detail


def test_stalled_body_gets_408(server: ServeProcess) -> None:
    with _connect(server, timeout=BODY_TIMEOUT_S + 8) as s:
        t0 = time.monotonic()
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 5000\r\n\r\n{"inputs": ['
        )
        response = _read_response(s)
        elapsed = time.monotonic() - t0
    assert _status(response) == 408, response[:300]
    assert BODY_TIMEOUT_S - 0.2 <= elapsed < BODY_TIMEOUT_S + 5, elapsed
    _healthy(server)


def test_idle_keep_alive_connection_is_closed(server: ServeProcess) -> None:
    with _connect(server, timeout=KEEP_ALIVE_S + 8) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _status(_read_response(s)) == 200
        t0 = time.monotonic()
        rest = b""
        with contextlib.suppress(ConnectionResetError):
            rest = s.recv(100)  # blocks until the server closes (b"") or the timeout
        elapsed = time.monotonic() - t0
    assert rest == b"", rest
    assert elapsed < KEEP_ALIVE_S + 5, elapsed


def test_slow_clients_do_not_starve_others(server: ServeProcess) -> None:
    """60 stalled bodies and 60 header tricklers open at once; normal requests stay fast."""
    stalled: list[socket.socket] = []
    tricklers: list[socket.socket] = []
    try:
        for _ in range(60):
            s = _connect(server, timeout=5.0)
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n{"
            )
            stalled.append(s)
            t = _connect(server, timeout=5.0)
            t.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            tricklers.append(t)
        latencies = []
        with httpx.Client(base_url=server.base_url, timeout=10) as c:
            for _round in range(12):  # about 3 s, trickling one header byte per client per round
                for t in tricklers:
                    with contextlib.suppress(OSError):
                        t.sendall(b"x")
                t0 = time.monotonic()
                r = c.post("/predict", json=_image_batch(2))
                latencies.append(time.monotonic() - t0)
                assert r.status_code == 200, r.text
                time.sleep(0.25)
        assert max(latencies) < 3.0, latencies
        # the stalled bodies were answered 408 by now (body_timeout_s), not left hanging
        answered = 0
        for s in stalled:
            s.settimeout(5.0)
            if _status(_read_response(s)) == 408:
                answered += 1
        assert answered == len(stalled)
    finally:
        for s in stalled + tricklers:
            s.close()
    _healthy(server)


def test_oversized_headers_are_refused_without_5xx(server: ServeProcess) -> None:
    with _connect(server, timeout=10.0) as s:
        big = b"X-Junk: " + b"a" * (1 << 20) + b"\r\n"
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + big + b"\r\n")
        response = _read_response(s)
    status = _status(response)
    assert status == 0 or 400 <= status < 500, response[:300]
    _healthy(server)


def test_huge_headers_are_cut_off_not_buffered(server: ServeProcess) -> None:
    """A 64 MiB header must be refused while it streams in, not parsed whole and then refused:
    the server closes the connection after a few MiB at most (loopback socket buffers), and
    the worker's memory does not grow by anything like the header's size."""
    pid = server.worker_pids()[0]
    rss_before = rss_bytes(pid)
    peak = rss_before
    sent = 0
    chunk = b"a" * (1 << 20)
    with _connect(server, timeout=5.0) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Junk: ")
        with contextlib.suppress(OSError):
            for _ in range(64):
                s.sendall(chunk)
                sent += len(chunk)
                peak = max(peak, rss_bytes(pid))
        with contextlib.suppress(OSError):
            s.sendall(b"\r\n\r\n")
        response = _read_response(s)
        peak = max(peak, rss_bytes(pid))
    status = _status(response)
    assert status == 0 or 400 <= status < 500, response[:300]
    growth_mib = (peak - rss_before) / 2**20
    assert sent <= 16 << 20, f"the server took {sent >> 20} MiB of headers before refusing them"
    assert growth_mib < 32, f"worker RSS grew {growth_mib:.0f} MiB while the headers arrived"
    _healthy(server)


def test_connection_that_never_finishes_its_headers_is_closed(server: ServeProcess) -> None:
    """Slowloris: a client that sends part of its headers and then trickles or stalls must
    be disconnected after a bounded time, like a stalled body (``body_timeout_s``), or
    enough such clients hold every file descriptor (and every ``limit_concurrency`` slot)."""
    bound = BODY_TIMEOUT_S + KEEP_ALIVE_S + 2
    with _connect(server, timeout=bound) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        t0 = time.monotonic()
        closed = False
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            closed = s.recv(100) == b"" or True  # any answer or EOF ends the wait
        elapsed = time.monotonic() - t0
    assert closed and elapsed < bound, (
        f"a connection with unfinished headers was still open after {elapsed:.1f} s"
    )

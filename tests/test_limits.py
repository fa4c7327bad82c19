"""Request limits of a live ``apd serve`` on loopback, probed over raw sockets.

* A body over ``max_body_bytes`` gets 413 from its ``Content-Length`` alone: the answer
  arrives while almost none of the announced body has been sent. A chunked body (no length)
  is cut off with 413 once it passes the limit, not read to its end.
* That 413 reaches every common client (urllib, requests, httpx, curl; with a length and
  chunked), not a connection reset: the server answers with ``Connection: close`` and reads
  what the client still sends for a bounded time and number of bytes (lingering close). A
  client that keeps sending is cut off within about a second, and the others are not slowed.
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
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import httpx
import pytest

from service.infra.http_server import LINGER_MAX_BYTES, LINGER_S
from tests.harness import LOOPBACK, ServeProcess, apd_serve, make_tiny_checkpoint, rss_bytes

MAX_BODY = 256 * 1024
MAX_BATCH = 8
BODY_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 2


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
    assert str(MAX_BODY) in r.json()["message"], r.text[:200]


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
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n{"
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


# --- the 413 for an oversized body reaches every client; refused bodies are not read on ----


OVERSIZED = b"[" + b"0.5," * (1 << 20) + b"0]"  # 4 MiB: 16 times the limit


def _chunks(data: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _urllib(url: str, chunked: bool) -> tuple[int, dict[str, str], bytes]:
    data = _chunks(OVERSIZED) if chunked else OVERSIZED  # an iterable is sent chunked
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _requests(url: str, chunked: bool) -> tuple[int, dict[str, str], bytes]:
    requests = pytest.importorskip("requests")
    data = _chunks(OVERSIZED) if chunked else OVERSIZED
    r = requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=10)
    return r.status_code, dict(r.headers), r.content


def _httpx(url: str, chunked: bool) -> tuple[int, dict[str, str], bytes]:
    content = _chunks(OVERSIZED) if chunked else OVERSIZED
    r = httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=10)
    return r.status_code, dict(r.headers), r.content


def _curl(url: str, chunked: bool) -> tuple[int, dict[str, str], bytes]:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    cmd = [curl, "-sS", "--max-time", "10", "-D", "-", "-H", "Content-Type: application/json"]
    if chunked:
        cmd += ["-H", "Transfer-Encoding: chunked"]
    done = subprocess.run(
        [*cmd, "--data-binary", "@-", url], input=OVERSIZED, capture_output=True, timeout=20
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    head, _, payload = done.stdout.rpartition(b"\r\n\r\n")
    lines = head.split(b"\r\n\r\n")[-1].split(b"\r\n")  # the last answer, after 100 Continue
    status = int(lines[0].split()[1])
    headers = {
        k.decode().strip(): v.decode().strip()
        for k, _, v in (line.partition(b":") for line in lines[1:])
    }
    return status, headers, payload


CLIENTS: dict[str, Callable[[str, bool], tuple[int, dict[str, str], bytes]]] = {
    "urllib": _urllib,
    "requests": _requests,
    "httpx": _httpx,
    "curl": _curl,
}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("client", list(CLIENTS))
def test_oversized_body_413_reaches_every_client(
    server: ServeProcess, client: str, chunked: bool
) -> None:
    """Each client sends a 4 MiB body in full before it reads an answer (urllib and requests
    do; httpx and curl read early when they can): every one gets the JSON 413, no reset."""
    status, headers, payload = CLIENTS[client](server.base_url + "/predict", chunked)
    assert status == 413, payload[:300]
    headers = {k.lower(): v for k, v in headers.items()}
    assert headers.get("connection", "").lower() == "close", headers
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert str(MAX_BODY) in json.loads(payload)["message"], payload[:300]
    _healthy(server)


def _send_until_cut(
    server: ServeProcess, chunk: bytes, pause_s: float, give_up_s: float = 15.0
) -> tuple[int, float, bytes]:
    """Announce 100 GB and keep sending ``chunk`` (every ``pause_s``) until the server cuts
    the connection; returns (bytes sent, seconds until the cut, what was answered)."""
    with _connect(server, timeout=5.0) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000000\r\n\r\n"
        )
        sent, t0 = 0, time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - t0 < give_up_s:
                s.sendall(chunk)
                sent += len(chunk)
                if pause_s:
                    time.sleep(pause_s)
        elapsed = time.monotonic() - t0
        s.settimeout(2.0)
        answer = _read_response(s)  # sent before the cut, still in our receive buffer
    return sent, elapsed, answer


def test_refused_body_is_read_for_about_a_second_at_most(server: ServeProcess) -> None:
    """A client trickling a refused body (about 3 MB/s, far under the byte bound) is cut
    off once the linger time is over: not at once (a client still sending its body could
    not read the 413) and not after the whole body (100 GB announced)."""
    sent, elapsed, answer = _send_until_cut(server, b"0" * (64 << 10), pause_s=0.02)
    assert _status(answer) == 413, answer[:300]
    assert 0.5 * LINGER_S < elapsed < LINGER_S + 1.5, f"cut after {elapsed:.2f} s"
    assert sent < LINGER_MAX_BYTES
    _healthy(server)


def test_refused_body_is_read_for_a_bounded_number_of_bytes(server: ServeProcess) -> None:
    """A client sending a refused body as fast as loopback allows is cut off once the
    server has discarded linger_max_bytes, well inside the second (uvicorn alone read and
    discarded 36 GB of such a body in 10 s on a keep-alive connection)."""
    sent, elapsed, answer = _send_until_cut(server, b"0" * (1 << 20), pause_s=0.0)
    assert _status(answer) == 413, answer[:300]
    slack = 32 << 20  # socket buffers on both sides
    assert sent < LINGER_MAX_BYTES + slack, f"{sent >> 20} MiB sent before the cut"
    assert elapsed < LINGER_S + 1.5, f"cut after {elapsed:.2f} s"
    _healthy(server)


def _predict_latencies(server: ServeProcess, n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        for _ in range(n):
            t0 = time.monotonic()
            r = c.post("/predict", json=_image_batch(1))
            out.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
    return out


UPLOADER = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"POST /predict HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 100000000000\\r\\n\\r\\n")
chunk, sent, t0 = b"0" * (1 << 20), 0, time.monotonic()
try:
    while time.monotonic() - t0 < 10:
        s.sendall(chunk)
        sent += len(chunk)
except OSError:
    pass
print(sent, time.monotonic() - t0)
"""


def test_refused_upload_does_not_slow_other_requests(server: ServeProcess) -> None:
    """A client uploading a 100 GB body as fast as loopback allows (its own process) while
    a normal client sends requests: those stay about as fast as on a quiet server, because
    the refused upload is cut off at once instead of being read on for seconds."""
    quiet = statistics.median(_predict_latencies(server, 30))
    uploader = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, str(server.port)], stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(0.05)
        busy = _predict_latencies(server, 30)
        out, _ = uploader.communicate(timeout=20)
    finally:
        uploader.kill()
    sent, seconds = out.split()
    assert int(sent) < LINGER_MAX_BYTES + (32 << 20) and float(seconds) < LINGER_S + 1.5, out
    assert statistics.median(busy) < 3 * quiet + 0.01, (quiet, statistics.median(busy))


def test_requests_that_are_read_in_full_keep_their_connection(server: ServeProcess) -> None:
    """Only a response that does not wait for the body closes the connection: a request
    whose body is read (here in pieces, well under the limit) is answered keep-alive."""
    payload = json.dumps(_image_batch(MAX_BATCH)).encode()
    assert len(payload) < MAX_BODY
    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with _connect(server, timeout=10.0) as s:
        for _ in range(2):  # the second request on the same connection
            s.sendall(head)
            for piece in _chunks(payload, 4096):
                s.sendall(piece)
            response = _read_response(s)
            assert _status(response) == 200, response[:300]
            assert b"connection: close" not in response.partition(b"\r\n\r\n")[0].lower()

"""What a hostile client sends: bodies of costly shapes, huge-pixel images, idle and slow
connections. Shared by ``tests/test_attacks.py`` (imported as ``attack_support``) and
``benchmarks/attacks.py`` (as ``tests.attack_support``). Raw sockets on loopback only; every
socket has a timeout."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import time
from collections.abc import Iterator
from typing import Final

LOOPBACK: Final = "127.0.0.1"
MB: Final = 1 << 20


def _fill(head: bytes, item: bytes, tail: bytes, size: int, sep: bytes = b",") -> bytes:
    n = max(1, (size - len(head) - len(tail)) // (len(item) + len(sep)))
    return head + sep.join([item] * n) + tail


def hostile_bodies(size: int = 8 * MB - 4096) -> dict[str, bytes]:
    """JSON bodies of about ``size`` bytes whose parse would cost far more than their size:
    an object of ~700,000 keys, a list of ~2.7 M empty lists, nesting ~4 M deep, one long
    string, ~4 M numbers in one example; and one that passes the scan (as many values as a
    valid request, each a 36-character string: 7.9 MB whatever ``size``)."""
    keys = b"{" + b",".join(b'"%d":0' % i for i in range(size // 12)) + b"}"
    return {
        "object of 700k keys": keys[:size].rpartition(b",")[0] + b"}",
        "inputs of empty lists": _fill(b'{"inputs":[', b"[]", b"]}", size),
        "deep nesting": b'{"inputs":' + b"[" * (size // 2 - 8) + b"]" * (size // 2 - 8) + b"}",
        "one long string": b'{"inputs":"' + b"a" * (size - 16) + b'"}',
        "4M numbers": _fill(b'{"inputs":[[', b"0", b"]]}", size),
        "200k strings": b'{"inputs":['
        + b",".join([b"[" + b",".join([b'"' + b"a" * 36 + b'"'] * 784) + b"]"] * 256)
        + b"]}",
    }


def small_predict_body(dim: int = 784, seed: int = 1) -> bytes:
    return json.dumps({"inputs": [[0.5] * dim], "num_samples": 10, "seed": seed}).encode()


def png(width: int, height: int) -> bytes:
    """A solid grey PNG (a 16,777,216 x 1 one is about 16 KB)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (width, height), 128).save(out, format="PNG", optimize=False)
    return out.getvalue()


def multipart(files: list[bytes], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body of ``files`` (field ``files``) and ``fields``."""
    boundary = "apd-attack-boundary"
    parts = []
    for i, data in enumerate(files):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{i}.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    for name, value in (fields or {}).items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def request_head(path: str, length: int, content_type: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((LOOPBACK, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


@contextlib.contextmanager
def idle_connections(
    port: int, n: int, path: str = "/predict", length: int = 1000, body: bytes = b""
) -> Iterator[list[socket.socket]]:
    """``n`` connections that sent a request's headers (announcing ``length`` bytes of
    body) and ``body`` (a part of it, or nothing), then nothing more."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = connect(port)
            s.sendall(request_head(path, length) + body)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()


def trickle(s: socket.socket, data: bytes, rate_bps: float, until: float) -> int:
    """Send ``data`` on ``s`` at about ``rate_bps`` bytes a second until it is sent, the
    server closes, or the monotonic time ``until``; the bytes sent."""
    sent = 0
    step = max(1, int(rate_bps / 10))
    while sent < len(data) and time.monotonic() < until:
        try:
            s.sendall(data[sent : sent + step])
        except OSError:
            break
        sent += step
        time.sleep(0.1)
    return min(sent, len(data))


def read_status(s: socket.socket, timeout: float = 10.0) -> int:
    """The status of the response read from ``s`` (0 if none came: closed or timed out)."""
    s.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    line = data.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isascii() and line[1].isdigit() else 0

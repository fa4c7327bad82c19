"""Logs and request ids: every line of ``apd serve`` is one JSON object (timestamp, level,
logger, message; the request id on a request's lines; method, path, status, duration and
client on access lines), with one worker and with two; ``X-Request-ID`` is taken when usable
and answered on every response, 4xx and 5xx included."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.api.app import create_app
from service.api.middleware import request_id_of
from service.config import Settings
from service.infra.logging_config import (
    JsonFormatter,
    RequestContextFilter,
    TextFormatter,
    bind_request,
    current_request_id,
    log_config,
    unbind_request,
)
from tests.harness import apd_serve, make_tiny_checkpoint
from tests.service_support import make_client

ROOT = Path(__file__).resolve().parents[1]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
HEX_ID = re.compile(r"[0-9a-f]{32}")
REQUIRED = ("timestamp", "level", "logger", "message", "pid")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ops") / "tiny.safetensors")


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """An ``apd.*`` logger writing JSON lines to a buffer, as ``apd serve`` configures it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("apd.test_ops")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def parse_time(stamp: str) -> datetime:
    assert TIMESTAMP.fullmatch(stamp), stamp
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


# --------------------------------------------------------------------------------------
# The formatter


def test_a_json_line_holds_the_record(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    before = datetime.now(UTC)
    logger.warning("cache %s unreachable\nsecond line é", "redis://x", extra={"block": 3})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    first, second = lines(stream)
    assert stream.getvalue().count("\n") == 2  # one line each, newlines escaped
    assert first["level"] == "WARNING" and first["logger"] == "apd.test_ops"
    assert first["message"] == "cache redis://x unreachable\nsecond line é"
    assert first["block"] == 3  # extra= fields are kept
    assert "request_id" not in first  # not in a request
    assert set(REQUIRED) <= set(first)
    stamp = parse_time(first["timestamp"])
    assert before - timedelta(milliseconds=1) <= stamp <= datetime.now(UTC)
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc_info"]
    assert second["exc_info"].startswith("Traceback")


def test_a_request_binds_its_id_to_every_line_and_the_access_line_gets_its_fields(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    access = logging.getLogger("uvicorn.access")
    access.addHandler(handler := logger.handlers[0])
    access.propagate, access_level = False, access.level
    access.setLevel(logging.INFO)
    try:
        token = bind_request("req-1")
        assert current_request_id() == "req-1"
        logger.info("inside")
        time.sleep(0.01)
        # The call uvicorn makes when a response starts (uvicorn.protocols.http.h11_impl).
        access.info('%s - "%s %s HTTP/%s" %d', "10.0.0.7:5123", "POST", "/predict?x=1", "1.1", 413)
        unbind_request(token)
        logger.info("outside")
    finally:
        access.removeHandler(handler)
        access.setLevel(access_level)
    inside, line, outside = lines(stream)
    assert inside["request_id"] == "req-1" and "request_id" not in outside
    assert current_request_id() is None
    assert line["logger"] == "uvicorn.access" and line["request_id"] == "req-1"
    assert line["message"] == '10.0.0.7:5123 - "POST /predict?x=1 HTTP/1.1" 413'
    assert (line["client"], line["method"], line["path"]) == (
        "10.0.0.7:5123",
        "POST",
        "/predict?x=1",
    )
    assert line["status"] == 413 and line["http_version"] == "1.1"
    assert 10.0 <= line["duration_ms"] < 5000


def test_text_lines_carry_the_same_fields() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", "/readyz", "1.1", 200),
        None,
    )
    token = bind_request("abc")
    try:
        RequestContextFilter().filter(record)
    finally:
        unbind_request(token)
    text = TextFormatter().format(record)
    assert re.fullmatch(
        r"\S+Z INFO +uvicorn\.access \[abc\] 127\.0\.0\.1:1 - \"GET /readyz HTTP/1\.1\" 200 "
        r"\d+\.\d ms",
        text,
    ), text
    assert TIMESTAMP.fullmatch(text.split()[0])


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_config_applies_to_every_logger(log_format: str) -> None:
    """dictConfig of log_config() in a fresh interpreter: the service's loggers, uvicorn's
    and a third-party one (through the root logger) all write in the chosen format."""
    code = (
        "import logging, logging.config, sys\n"
        "from service.infra.logging_config import log_config\n"
        f"logging.config.dictConfig(log_config('info', {log_format!r}))\n"
        "logging.getLogger('apd.service').info('app')\n"
        "logging.getLogger('uvicorn.error').info('server')\n"
        "logging.getLogger('redis.client').warning('library')\n"
        "logging.getLogger('redis.client').info('quiet below WARNING')\n"
        "logging.getLogger('apd.service').debug('quiet below the level')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    out = proc.stderr.splitlines()
    assert len(out) == 3 and proc.stdout == "", proc.stderr
    if log_format == "json":
        got = [(d["logger"], d["message"]) for d in map(json.loads, out)]
        assert got == [
            ("apd.service", "app"),
            ("uvicorn.error", "server"),
            ("redis.client", "library"),
        ]
    else:
        assert [line.split()[2] for line in out] == ["apd.service", "uvicorn.error", "redis.client"]
    with pytest.raises(ValueError, match="log_format"):
        log_config("info", "xml")


# --------------------------------------------------------------------------------------
# X-Request-ID


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"abc-123", True),
        (b"x" * 128, True),
        (b"Root=1-67891233-abcdef012345678912345678;Parent=1", True),
        (b"x" * 129, False),  # too long
        (b"", False),
        (b"has space", False),
        (b"tab\there", False),
        ("caf\u00e9".encode(), False),  # not ASCII
    ],
)
def test_an_incoming_request_id_is_kept_only_when_usable(sent: bytes, kept: bool) -> None:
    got = request_id_of([(b"accept", b"*/*"), (b"x-request-id", sent)])
    if kept:
        assert got == sent.decode()
    else:
        assert HEX_ID.fullmatch(got)
    assert HEX_ID.fullmatch(request_id_of([]))
    assert request_id_of([]) != request_id_of([])


def test_every_response_carries_the_request_id(
    ckpt: Path, captured: tuple[logging.Logger, io.StringIO]
) -> None:
    logger, stream = captured
    settings = Settings(
        checkpoint=ckpt, redis_url=None, pool_size=20, max_body_bytes=4096, num_threads=1
    )
    app = create_app(settings)

    @app.get("/test-log")
    def log_something() -> dict[str, str]:
        logger.info("handled")
        return {}

    @app.get("/test-crash")
    def crash() -> None:
        raise RuntimeError("unhandled")

    tiny_budget = create_app(settings.model_copy(update={"memory_budget_mb": 0.01}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Starlette deprecates TestClient's httpx transport
        from fastapi.testclient import TestClient
    with (
        TestClient(app, raise_server_exceptions=False) as c,
        make_client(tiny_budget) as overloaded,
    ):
        image = {"inputs": [[0.5] * 784]}
        cases = [
            (c.get("/readyz"), 200),
            (c.post("/predict", json=image), 200),
            (c.post("/predict", json={"inputs": []}), 422),
            (c.get("/nowhere"), 404),
            # 413 from the size limit, before routing: the body is never read
            (
                c.post(
                    "/predict", content=b"[" * 5000, headers={"content-type": "application/json"}
                ),
                413,
            ),
            (overloaded.post("/predict", json=image), 503),  # over the whole memory budget
            (c.get("/test-crash"), 500),  # Starlette's error middleware answers
            (c.get("/v2/health/ready"), 200),
        ]
        for response, status in cases:
            assert response.status_code == status, response.text
            assert HEX_ID.fullmatch(response.headers["x-request-id"]), response.headers
        ids = [r.headers["x-request-id"] for r, _ in cases]
        assert len(set(ids)) == len(ids)
        assert "Retry-After" in cases[5][0].headers
        # The client's own id comes back, on a success and on an error.
        for path in ("/readyz", "/nowhere"):
            r = c.get(path, headers={"X-Request-ID": "client-id-7"})
            assert r.headers.get_list("x-request-id") == ["client-id-7"]
        r = c.get("/test-log", headers={"X-Request-ID": "from-the-client"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "from-the-client"
    (line,) = [d for d in lines(stream) if d["message"] == "handled"]
    assert line["request_id"] == "from-the-client"


# --------------------------------------------------------------------------------------
# apd serve


def _serve_lines(log: str) -> list[dict[str, Any]]:
    out = []
    for raw in log.splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {raw!r}")
        assert isinstance(line, dict) and set(REQUIRED) <= set(line), raw
        out.append(line)
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_every_line_of_apd_serve_is_json(ckpt: Path, workers: int) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    args = [
        "--workers",
        str(workers),
        "--pool-size",
        "20",
        "--num-threads",
        "1",
        "--max-body-bytes",
        "4096",
    ]
    with apd_serve(ckpt, args=args) as server, httpx.Client(base_url=server.base_url) as c:
        json_body = {"content-type": "application/json"}
        sent = {
            "mine-1": c.get("/readyz", headers={"X-Request-ID": "mine-1"}),
            "mine-2": c.post(
                "/predict?k=1", json={"inputs": [[0.5] * 784]}, headers={"X-Request-ID": "mine-2"}
            ),
            "mine-3": c.post(
                "/predict", content=b"[" * 5000, headers={"X-Request-ID": "mine-3", **json_body}
            ),
        }
        generated = c.get("/nowhere")
        pids = {server.proc.pid, *server.worker_pids()}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            "/nowhere" not in server.log()
            or server.log().count("Application startup complete.") < workers
        ):
            time.sleep(0.05)
        log = server.log()
    got = _serve_lines(log)
    assert [r.status_code for r in sent.values()] == [200, 200, 413]
    assert generated.status_code == 404
    end = datetime.now(UTC)
    for line in got:
        assert start <= parse_time(line["timestamp"]) <= end
        assert line["pid"] in pids
        assert line["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    loggers = {line["logger"] for line in got}
    assert {"uvicorn.error", "uvicorn.access", "apd.service"} <= loggers
    access = {line["request_id"]: line for line in got if line["logger"] == "uvicorn.access"}
    expected = {
        "mine-1": ("GET", "/readyz", 200),
        "mine-2": ("POST", "/predict?k=1", 200),
        "mine-3": ("POST", "/predict", 413),
        generated.headers["x-request-id"]: ("GET", "/nowhere", 404),
    }
    for request_id, (method, path, status) in expected.items():
        line = access[request_id]
        assert (line["method"], line["path"], line["status"]) == (method, path, status)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", line["client"])
        assert isinstance(line["duration_ms"], float) and 0 < line["duration_ms"] < 10_000
    if workers > 1:
        started = {
            line["pid"] for line in got if line["message"] == "Application startup complete."
        }
        assert len(started) == workers

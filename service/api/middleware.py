"""Pure ASGI middleware: request ids, request metrics, the request-body size limit and a body
deadline.

Every response carries ``X-Request-ID``: the client's own, when it sends a usable one (1 to
128 visible ASCII characters: ``!`` to ``~``, no spaces), else a fresh uuid4 in hex. While
the request is served the id is in the logging context (:mod:`service.infra.logging_config`), so
the service's log lines and uvicorn's access line for it carry it.

The size limit answers 413 from ``Content-Length`` before reading anything, and counts bytes
while a body without one streams in, stopping at the limit; its message names the limit.
(FastAPI's own ``max_body_size`` does the same but replaces every such answer with a
plain-text "Content Too Large", which breaks the API's JSON error contract.) These refusals
say ``Connection: close``: the rest of the body is not read to reach a next request on the
connection; :mod:`service.infra.http_server` closes it the way every client can read the answer.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, Final

import anyio
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_content
from service.config import Settings
from service.core.repository import ModelRepository
from service.infra.admission import (
    DECODE_BYTES_PER_PIXEL,
    MULTIPART,
    V2_HEADER_LENGTH,
    JsonShape,
    MemoryBudget,
    ParseLimits,
)
from service.infra.logging_config import bind_request, unbind_request
from service.infra.telemetry import Metrics

KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REQUEST_ID_HEADER: Final = b"x-request-id"
_USABLE_REQUEST_ID: Final = re.compile(rb"[!-~]{1,128}")
_ASCII_DIGITS: Final = re.compile(r"[0-9]{1,18}")


def declared_length(value: str | None) -> int:
    """A byte count in a header (``Content-Length``, ``Inference-Header-Content-Length``),
    -1 when absent or not 1 to 18 ASCII digits (``str.isdigit`` alone would accept "²",
    which ``int`` refuses, and ``int`` refuses more than 4,300 digits)."""
    if value is None or not _ASCII_DIGITS.fullmatch(value):
        return -1
    return int(value)


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` (the first one) if usable, else a new uuid4 in hex."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER:
            if _USABLE_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives each HTTP request its id (:func:`request_id_of`), binds it to the logging
    context while the request is served, and sends it back in ``X-Request-ID``.

    It wraps the whole application, outside Starlette's error middleware (see
    ``service.api.app.APDService``), so a 500 for an unhandled exception carries the header too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope.get("headers", ()))
        header = (REQUEST_ID_HEADER, request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    h for h in message.get("headers", ()) if h[0].lower() != REQUEST_ID_HEADER
                ]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        token = bind_request(request_id)
        # Unbound only when the app returns: after an exception, the server logs it from
        # this request's task, and that line keeps the id (each request has its own task,
        # so the binding goes no further).
        await self.app(scope, receive, send_with_id)
        unbind_request(token)


def _leaf_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Routes with a path template, through included routers (FastAPI >= 0.16x wraps them)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _leaf_routes(included.routes)
        elif isinstance(getattr(route, "path", None), str) and hasattr(route, "path_regex"):
            yield route


class MetricsMiddleware:
    """Counts requests by route template, method and status, and times them."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._routes: list[Any] | None = None

    def _endpoint(self, scope: Scope) -> str:
        """The route template; for a request answered before routing (an early 413), the
        template its path matches. Never a raw unknown path: label values stay bounded."""
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        if self._routes is None:
            self._routes = list(_leaf_routes(getattr(scope.get("app"), "routes", ())))
        for route in self._routes:
            if route.path_regex.match(scope.get("path", "")):
                return str(route.path)
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        m = self.metrics
        m.requests_in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            m.requests_in_flight.dec()
            endpoint = self._endpoint(scope)
            method = scope.get("method", "")
            method = method if method in KNOWN_METHODS else "OTHER"
            m.requests.labels(endpoint=endpoint, method=method, status=str(status)).inc()
            m.request_duration.labels(endpoint=endpoint).observe(time.perf_counter() - start)


class BodyTimeoutMiddleware:
    """A request body must arrive by its rate and in time, or it gets 408 (the connection is
    then closed): after ``grace_s`` it must have come at ``min_rate`` bytes per second or
    more on average, and all of it within ``timeout_s`` of the request's start. A client that
    stalls, or trickles a few bytes a second, is cut off after ``grace_s``, not after the
    whole ``timeout_s``; a fast one has all of ``timeout_s``. ``min_rate`` 0: only the total.
    """

    def __init__(
        self, app: ASGIApp, timeout_s: float, min_rate: int = 0, grace_s: float = 5.0
    ) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.min_rate = min_rate
        self.grace_s = grace_s

    def allowed_s(self, received: int) -> float:
        """Seconds from the request's start that a body with ``received`` bytes in may take
        before its next bytes arrive."""
        if not self.min_rate:
            return self.timeout_s
        return min(self.timeout_s, max(self.grace_s, received / self.min_rate))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        received = 0
        body_done = False

        async def receive_by_deadline() -> Message:
            nonlocal body_done, received
            if body_done:
                return await receive()
            allowed = self.allowed_s(received)
            try:
                async with asyncio.timeout_at(start + allowed):
                    message = await receive()
            except TimeoutError:
                if allowed >= self.timeout_s:
                    detail = f"request body not received within body_timeout_s={self.timeout_s:g} s"
                else:
                    detail = (
                        f"request body arrived too slowly: {received} bytes in {allowed:.1f} s, "
                        f"under min_body_rate_bytes_s={self.min_rate} after "
                        f"body_grace_s={self.grace_s:g} s"
                    )
                raise HTTPException(status_code=408, detail=detail) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, receive_by_deadline, send)


CLOSE: Final = {"Connection": "close"}


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes``, without reading more of it than the limit;
    431 for request headers over ``max_header_bytes`` in all. Both close the connection."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes
        self.message = (
            f"request body is larger than the limit of {max_bytes} bytes (max_body_bytes)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
        if header_bytes > self.max_header_bytes:
            message = (
                f"request headers hold {header_bytes} bytes; the limit is "
                f"{self.max_header_bytes} (max_header_bytes)"
            )
            content = error_content(str(scope.get("path", "")), 431, message)
            response = JSONResponse(content, status_code=431, headers=CLOSE)
            await response(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared_length(declared) > self.max_bytes:
            content = error_content(str(scope.get("path", "")), 413, self.message, ("body",))
            response = JSONResponse(content, status_code=413, headers=CLOSE)
            await response(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=self.message, headers=CLOSE)
            return message

        await self.app(scope, receive_within_limit, send)


def _json_part(body: bytes, headers: Headers) -> bytes | memoryview:
    """The JSON text of a body: all of it, or a V2 binary request's header."""
    declared = declared_length(headers.get(V2_HEADER_LENGTH))
    return memoryview(body)[:declared] if declared >= 0 else body


def request_cost(
    repository: ModelRepository, settings: Settings, body: bytes, headers: Headers
) -> int:
    """Memory a request with this complete body may hold while it is served: the body, what
    parsing it makes and the forward's working set, for the widest model served (the body
    may name any); :class:`HTTPException` 413 for a JSON body that holds more than a valid
    request to any of them (:class:`ParseLimits`)."""
    models = repository.served()
    if not models:
        return len(body)
    widest = max(models, key=lambda m: m.checkpoint.spec.input_dim)
    if headers.get("content-type", "").lower().startswith(MULTIPART):
        parse = settings.max_image_pixels * DECODE_BYTES_PER_PIXEL + 2 * len(body)
        inputs = settings.max_batch
    else:
        shape = tuple(widest.checkpoint.meta.input.shape)
        limits = ParseLimits.of(shape, settings.max_batch)
        found = JsonShape.scan(_json_part(body, headers))
        refusal = limits.refusal(found)
        if refusal is not None:
            raise HTTPException(status_code=413, detail=refusal)
        parse = limits.parse_bytes(found, len(body))
        dim = widest.checkpoint.spec.input_dim
        inputs = min(settings.max_batch, found.values // dim + 1)
        if len(body) > len(_json_part(body, headers)):  # V2 binary tensors
            inputs = settings.max_batch
    return len(body) + parse + max(m.posterior.peak_bytes(inputs) for m in models)


class AdmissionMiddleware:
    """When the app first reads a request's body: receives all of it (charging its bytes as
    they arrive), bounds its cost (:func:`request_cost`), reserves that in the worker's
    budget, and hands the app the body in one message; releases it all when the request is
    done. Before startup completes (no repository) it passes requests through.

    Once the body is in, it listens for the client leaving: a client that disconnects before
    its answer is sent cancels the request (the forward stops at its next chunk,
    :mod:`service.core.model`), and its reservation is released at once
    (``apd_requests_cancelled_total{reason="disconnect"}``).

    It runs inside the body limit and deadline middlewares, whose 413 and 408 it passes on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope.get("app"), "state", None)
        repository: ModelRepository | None = getattr(state, "repository", None)
        if scope["type"] != "http" or repository is None or state is None:
            await self.app(scope, receive, send)
            return
        budget: MemoryBudget = state.budget
        settings: Settings = state.settings
        metrics: Metrics = state.metrics
        client = scope.get("client")
        address = str(client[0]) if client else ""
        held = 0
        body_read = False
        body_in = asyncio.Event()
        left = asyncio.Event()
        responded = False
        cancel = anyio.CancelScope()

        async def receive_admitted() -> Message:
            nonlocal held, body_read
            if body_read:
                await left.wait()  # the watcher below reads the connection from now on
                return {"type": "http.disconnect"}
            body_read = True
            chunks: list[bytes] = []
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return message  # disconnected: the app stops reading
                chunk = message.get("body", b"")
                if chunk:
                    budget.hold(len(chunk))
                    held += len(chunk)
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            del chunks
            need = request_cost(repository, settings, body, Headers(scope=scope))
            extra = max(0, need - held)
            await budget.acquire(extra, "request", address)
            held += extra
            body_in.set()
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_noting_the_end(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                responded = True
            await send(message)

        async def watch() -> None:
            await body_in.wait()
            message = await receive()  # returns when the client leaves or the answer is sent
            if message["type"] == "http.disconnect" and not responded:
                left.set()
                metrics.requests_cancelled.labels(reason="disconnect").inc()
                cancel.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            with cancel:
                await self.app(scope, receive_admitted, send_noting_the_end)
        finally:
            watcher.cancel()
            if held:
                budget.release(held)

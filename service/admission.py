"""Memory admission: a per-worker budget of in-flight work, so that load queues or gets 503
instead of growing the worker's memory (docs/limits.md).

A request that sends a body reserves, before the first byte of it is read, everything it
may hold while it is served (:meth:`service.runtime.ServiceRuntime.request_bytes`): its body
times :data:`BODY_EXPANSION` (what JSON numbers cost once parsed into Python objects and
then a float array) and the forward's working set for as many inputs as such a body can
hold (the inputs, the projection and one chunk of networks, bounded whatever K). The whole
reservation is taken at once, so requests never hold part of what they need while waiting
for the rest (no deadlock), and it is held until the response is sent: a client that stalls
mid-body keeps its reservation only until ``body_timeout_s`` (408).

A reservation that does not fit waits, first come first served, for at most
``admission_wait_s`` (the client's upload waits too: nothing of its body is read), then the
request is answered 503 with ``Retry-After``. One larger than the whole budget can never fit
and is refused at once.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Final

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.telemetry import Metrics

# Parsed JSON: a float of ~8-19 characters becomes a 24-byte Python float plus an 8-byte list
# slot, then 8 bytes of float64 and 4 of float32 while validated: at most ~6x its text.
BODY_EXPANSION: Final = 6


class Overloaded(HTTPException):
    """503 with ``Retry-After``: the memory budget stayed full for ``admission_wait_s``."""

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__(
            status_code=503,
            detail=detail,
            headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
        )


class MemoryBudget:
    """Bytes of in-flight work admitted at once; waiters are served in arrival order.

    Used from one event loop; ``release`` is synchronous so that it can run in ``finally``.
    """

    def __init__(self, capacity_bytes: int, wait_s: float, metrics: Metrics) -> None:
        if capacity_bytes < 1:
            raise ValueError("the memory budget must be positive")
        self.capacity = capacity_bytes
        self.wait_s = wait_s
        self.used = 0
        self._metrics = metrics
        metrics.admission_budget.set(capacity_bytes)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _take(self, nbytes: int) -> None:
        self.used += nbytes
        self._metrics.admission_bytes.set(self.used)

    async def acquire(self, nbytes: int, stage: str) -> None:
        """Reserve ``nbytes``, waiting at most ``wait_s``; :class:`Overloaded` if not."""
        if nbytes > self.capacity:
            self._metrics.admission_rejected.labels(stage=stage).inc()
            raise Overloaded(
                f"this request needs {nbytes} bytes of working memory, more than the worker's "
                f"whole budget of {self.capacity} (memory_budget_mb); send fewer inputs",
                self.wait_s,
            )
        if not self._waiters and self.used + nbytes <= self.capacity:
            self._take(nbytes)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.wait_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if fut.done() and not fut.cancelled():
                self.release(nbytes)  # granted just as we gave up
            else:
                fut.cancel()
                self._waiters.remove(entry)
                self._wake()
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._metrics.admission_rejected.labels(stage=stage).inc()
            raise Overloaded(
                f"the server is at its memory budget ({self.capacity} bytes of in-flight work) "
                f"and this request waited {self.wait_s:g} s; retry later",
                self.wait_s,
            ) from None

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        self._metrics.admission_bytes.set(self.used)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            nbytes, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.used + nbytes > self.capacity:
                return
            self._waiters.popleft()
            self._take(nbytes)
            fut.set_result(None)


class AdmissionMiddleware:
    """Reserves a request's memory in the runtime's budget when the app first reads its body,
    and releases it when the request is done. Before startup completes (no runtime) it passes
    requests through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope.get("app"), "state", None)
        runtime = getattr(state, "runtime", None)
        if scope["type"] != "http" or runtime is None:
            await self.app(scope, receive, send)
            return
        budget: MemoryBudget = runtime.budget
        held = 0
        declared = Headers(scope=scope).get("content-length")

        async def receive_admitted() -> Message:
            nonlocal held
            if not held:
                length = int(declared) if declared is not None and declared.isdigit() else None
                need = runtime.request_bytes(length)
                await budget.acquire(need, "request")
                held = need
            return await receive()

        try:
            await self.app(scope, receive_admitted, send)
        finally:
            if held:
                budget.release(held)

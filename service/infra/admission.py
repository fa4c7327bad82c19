"""Admission: what a request may cost a worker, charged to one per-worker memory budget, so
that load queues or gets 503 instead of growing the worker's memory (docs/limits.md).

**Nothing is reserved for a request until its body is in.** While the body arrives, the bytes
received so far are charged as they come (:meth:`MemoryBudget.hold`, never waiting: a body that
does not fit is answered 503 at once). A client that connects and sends nothing, or sends
slowly, holds only what it has sent (and :class:`service.api.middleware.BodyTimeoutMiddleware`
cuts it off by its rate), so it delays no one.

**The body's parse cost is bounded before it is parsed.** Once the body is complete its JSON
(all of it, or a V2 binary request's JSON header) is scanned (:meth:`JsonShape.scan`, a few
byte counts at C speed). Every container, key, string or value that parsing can make is
marked in the text by a ``[``/``{``, ``:``, ``"`` or ``,``, so the counts bound what parsing
makes whatever the body's shape (bytes inside strings are counted too: an upper bound). A
body holding more than a valid request of this model can hold (:class:`ParseLimits`:
``max_batch`` examples of the input shape, flat or nested, and a few hundred keys) is refused
with 413 naming the limit, unparsed: an 8 MB object of 700,000 keys or
``{"inputs":[[],[],...]}`` costs a scan, not its parse. A multipart upload is charged its
decoded pixels' limit (``max_image_pixels``; the route refuses images past it before
decoding them).

**Then the whole request is reserved at once**: the body held, its parse cost
(:meth:`ParseLimits.parse_bytes`) and the forward's working set for as many inputs as it can
hold. Reserving in one piece means no request holds part of what it needs while waiting for
the rest (no deadlock). A reservation that does not fit waits, first come first served, at
most ``admission_wait_s``, then gets 503 with ``Retry-After``. The queue is bounded: at most
``admission_queue`` waiters per worker and ``admission_queue_per_client`` per client address;
past either the newest request is shed at once (503, ``Retry-After``). What is reserved is
released when the response is sent, or at once when the client leaves
(:class:`service.api.middleware.AdmissionMiddleware` applies all this to each HTTP request).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Final

from starlette.exceptions import HTTPException

from service.infra.telemetry import Metrics

# What parsing costs: 256 examples of 784 values of every shape, parsed and checked (orjson,
# then Python's parser for an invalid body, then pydantic's errors for its first invalid
# example), stay under 128 bytes per value plus 12 x the body (benchmarks/attacks.py records
# each shape's peak beside this bound, in benchmarks/results/attacks.md).
PARSE_BYTES_PER_VALUE: Final = 128
PARSE_BYTES_PER_BODY_BYTE: Final = 12
# Keys a valid request holds: V2's id, parameters, one input and its outputs' are a few dozen.
MAX_KEYS: Final = 256
# Containers and values beyond the examples: the request object, its parameters and outputs.
SLACK: Final = 256
# Bytes one decoded pixel may hold while an image is decoded, converted and resized (the
# widest images, one row of millions of pixels, take the most: the decoder's row buffers).
DECODE_BYTES_PER_PIXEL: Final = 20
MULTIPART: Final = "multipart/form-data"
V2_HEADER_LENGTH: Final = "inference-header-content-length"


class Overloaded(HTTPException):
    """503 with ``Retry-After``: the budget stayed full for ``admission_wait_s``, or the
    queue (or this client's share of it) is full."""

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__(
            status_code=503,
            detail=detail,
            headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
        )


@dataclass(frozen=True)
class JsonShape:
    """Upper bounds of what parsing a JSON text makes, from byte counts: ``containers``
    (``[`` and ``{``), ``keys`` (``:``), ``strings`` (pairs of ``"``) and ``separators``
    (``,``). Bytes inside strings count too, so each is a bound, never an underestimate."""

    containers: int
    keys: int
    strings: int
    separators: int

    @classmethod
    def scan(cls, text: bytes | memoryview) -> JsonShape:
        raw = bytes(text) if isinstance(text, memoryview) else text
        return cls(
            containers=raw.count(b"[") + raw.count(b"{"),
            keys=raw.count(b":"),
            strings=raw.count(b'"') // 2,
            separators=raw.count(b","),
        )

    @property
    def values(self) -> int:
        """Values parsing can make: one per separator, one more per container."""
        return self.separators + self.containers + 1


@dataclass(frozen=True)
class ParseLimits:
    """What the JSON of a valid request to this model can hold: ``values``, those of
    ``max_batch`` examples of the input ``shape`` nested to it (each list a value too), plus
    :data:`SLACK` for the rest of the request, and :data:`MAX_KEYS` keys. A body within them
    is parsed, and a wrong one gets its 422 naming the problem."""

    values: int
    keys: int
    max_batch: int
    shape: tuple[int, ...]

    @classmethod
    def of(cls, shape: tuple[int, ...], max_batch: int) -> ParseLimits:
        nested = 1  # the example's own list, then one per row (per channel, per row...)
        level = 1
        for n in shape[:-1]:
            level *= n
            nested += level
        return cls(
            values=max_batch * (math.prod(shape) + nested) + SLACK,
            keys=MAX_KEYS,
            max_batch=max_batch,
            shape=shape,
        )

    def refusal(self, found: JsonShape) -> str | None:
        """Why a body of this shape is refused unparsed (413), or None."""
        if found.values > self.values:
            shape = "x".join(map(str, self.shape))
            return (
                f"request body holds up to {found.values} JSON values (arrays and objects "
                f"included); max_batch={self.max_batch} examples of the model's input "
                f"({shape}) and the request's other fields hold at most {self.values} "
                "(refused before parsing)"
            )
        if found.keys > self.keys:
            return (
                f"request body holds up to {found.keys} object keys; a request has at most "
                f"{self.keys} (refused before parsing)"
            )
        return None

    @staticmethod
    def parse_bytes(found: JsonShape, body_bytes: int) -> int:
        """Memory parsing and checking such a body may take (see the constants)."""
        values = found.values + found.keys + found.strings
        return values * PARSE_BYTES_PER_VALUE + body_bytes * PARSE_BYTES_PER_BODY_BYTE


class MemoryBudget:
    """Bytes of in-flight work admitted at once; waiters are served in arrival order, at most
    ``max_queue`` of them and ``max_queue_per_client`` from one client.

    Used from one event loop; ``release`` is synchronous so that it can run in ``finally``.
    """

    def __init__(
        self,
        capacity_bytes: int,
        wait_s: float,
        metrics: Metrics,
        max_queue: int = 64,
        max_queue_per_client: int = 8,
    ) -> None:
        if capacity_bytes < 1:
            raise ValueError("the memory budget must be positive")
        self.capacity = capacity_bytes
        self.wait_s = wait_s
        self.max_queue = max_queue
        self.max_queue_per_client = max_queue_per_client
        self.used = 0
        self._metrics = metrics
        metrics.admission_budget.set(capacity_bytes)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._queued_by_client: Counter[str] = Counter()

    def _take(self, nbytes: int) -> None:
        self.used += nbytes
        self._metrics.admission_bytes.set(self.used)

    def _refuse(self, stage: str, detail: str) -> Overloaded:
        self._metrics.admission_rejected.labels(stage=stage).inc()
        return Overloaded(detail, self.wait_s)

    def hold(self, nbytes: int, stage: str = "body") -> None:
        """Charge ``nbytes`` (body bytes as they arrive) now, or :class:`Overloaded` at once:
        received bytes cannot wait."""
        if self.used + nbytes > self.capacity:
            raise self._refuse(
                stage,
                f"the server is at its memory budget ({self.capacity} bytes of in-flight "
                "work, memory_budget_mb) and cannot take this body now; retry later",
            )
        self._take(nbytes)

    async def acquire(self, nbytes: int, stage: str, client: str = "") -> None:
        """Reserve ``nbytes``, waiting at most ``wait_s``; :class:`Overloaded` if not, or at
        once when it can never fit or the queue (or ``client``'s share of it) is full."""
        if nbytes > self.capacity:
            raise self._refuse(
                stage,
                f"this request needs {nbytes} bytes of working memory, more than the worker's "
                f"whole budget of {self.capacity} (memory_budget_mb); send fewer inputs",
            )
        if nbytes == 0 or (not self._waiters and self.used + nbytes <= self.capacity):
            self._take(nbytes)
            return
        if len(self._waiters) >= self.max_queue:
            raise self._refuse(
                stage,
                f"the server is at its memory budget and {len(self._waiters)} requests are "
                f"queued (admission_queue={self.max_queue}); retry later",
            )
        if self._queued_by_client[client] >= self.max_queue_per_client:
            raise self._refuse(
                stage,
                f"the server is at its memory budget and this client has "
                f"{self._queued_by_client[client]} requests queued (admission_queue_per_client"
                f"={self.max_queue_per_client}); retry later",
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, fut)
        self._waiters.append(entry)
        self._queued_by_client[client] += 1
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
            raise self._refuse(
                stage,
                f"the server is at its memory budget ({self.capacity} bytes of in-flight work) "
                f"and this request waited {self.wait_s:g} s; retry later",
            ) from None
        finally:
            self._queued_by_client[client] -= 1
            if not self._queued_by_client[client]:
                del self._queued_by_client[client]

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

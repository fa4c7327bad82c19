"""uvicorn's h11 HTTP protocol with a deadline for each request's headers.

uvicorn arms no timer while a request's headers are still arriving: a client that sends
part of its headers and then trickles or stalls (slowloris) keeps its connection, a file
descriptor and a ``limit_concurrency`` slot for as long as it likes. Here, from the moment a
connection opens or a response completes, the next request's headers must be complete
within ``header_timeout_s``, or the connection is closed. A request whose headers are in is
left alone: its body has ``body_timeout_s`` (:mod:`service.middleware`), its handler no limit.

The h11 parser (not httptools) is used on purpose: with ``h11_max_incomplete_event_size`` it
also bounds the size of headers while they stream in; httptools buffers any header whole.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Final

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT_S: Final = 10.0
ENV: Final = "APD_HEADER_TIMEOUT_S"


def _from_env() -> float:
    try:
        value = float(os.environ.get(ENV, DEFAULT_HEADER_TIMEOUT_S))
    except ValueError:
        return DEFAULT_HEADER_TIMEOUT_S
    return value if value > 0 else DEFAULT_HEADER_TIMEOUT_S


class HeaderTimeoutH11Protocol(H11Protocol):
    """:class:`~uvicorn.protocols.http.h11_impl.H11Protocol` plus a header deadline.

    ``header_timeout_s`` is a class attribute: ``apd serve`` sets it for a single worker and
    exports ``APD_HEADER_TIMEOUT_S``, read here at import, for worker processes.
    """

    header_timeout_s: float = _from_env()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_overdue(self) -> None:
        self._header_deadline = None
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if waiting_for_headers and not self.transport.is_closing():
            self.transport.close()

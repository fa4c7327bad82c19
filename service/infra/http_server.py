"""uvicorn's h11 HTTP protocol with three bounds: on the time a request's headers may take, on
how much of a refused request body is read, and on what a stalled body can do to a shutdown.

**Header deadline.** uvicorn arms no timer while a request's headers are still arriving: a
client that sends part of its headers and then trickles or stalls (slowloris) keeps its
connection, a file descriptor and a ``limit_concurrency`` slot for as long as it likes. Here,
from the moment a connection opens or a response completes, the next request's headers must be
complete within ``header_timeout_s``, or the connection is closed. A request whose headers are
in is left alone: its body has ``body_timeout_s`` (:mod:`service.api.middleware`), its handler no
limit.

**Lingering close of a refused body.** A response that starts while the request body is still
arriving (413 over ``max_body_bytes``, 408, 404...) gets ``Connection: close``, and once it is
sent the connection is closed the way nginx does it: write side shut down (the client reads the
answer, then end of stream), then what the client still sends is read and discarded until it
closes its side, for at most ``linger_s`` and ``linger_max_bytes``, and only then the socket is
closed. Without this, either of two things happens. Closing at once, with body bytes unread,
makes the kernel send a reset: a client still writing its body (Python's urllib, which reads
nothing until it has sent everything) gets ``ECONNRESET`` instead of the 413. Keeping the
connection alive, as uvicorn does without ``Connection: close``, reads and discards the whole
body, however large (11 GB in 10 s, measured), to reach the next request. A client that has
sent its body (or that waits for ``100 Continue``) reads the 413; one that is still sending
after the linger gets a reset then, as from nginx.

**Shutdown.** On SIGTERM uvicorn stops accepting and lets requests in flight finish (for at
most ``timeout_graceful_shutdown``, ``--shutdown-grace-s``); a request whose body is still
arriving is not waited for: its connection is closed at once (:meth:`shutdown`).

The h11 parser (not httptools) is used on purpose: with ``h11_max_incomplete_event_size`` it
also bounds the size of headers while they stream in; httptools buffers any header whole. This
subclasses uvicorn internals (the request cycle's use of its transport and of h11's states), so
``pyproject.toml`` pins uvicorn to the minor version it was tested with.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Final

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT_S: Final = 10.0
ENV: Final = "APD_HEADER_TIMEOUT_S"
LINGER_S: Final = 1.0
LINGER_MAX_BYTES: Final = 64 << 20
_CLOSE: Final = (b"connection", b"close")


def _from_env() -> float:
    try:
        value = float(os.environ.get(ENV, DEFAULT_HEADER_TIMEOUT_S))
    except ValueError:
        return DEFAULT_HEADER_TIMEOUT_S
    return value if value > 0 else DEFAULT_HEADER_TIMEOUT_S


class _LingeringTransport(asyncio.Transport):
    """The connection's transport as uvicorn's code sees it: every call goes to the socket's
    transport, except ``close()``, which asks the protocol (a lingering close when a body is
    unread), and reading, which a lingering connection keeps on."""

    def __init__(self, transport: asyncio.Transport, protocol: BoundedH11Protocol) -> None:
        super().__init__()
        self.socket_transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol.close_connection()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self.socket_transport.is_closing()

    def pause_reading(self) -> None:
        if not self._protocol.lingering:
            self.socket_transport.pause_reading()

    def resume_reading(self) -> None:
        self.socket_transport.resume_reading()

    def is_reading(self) -> bool:
        return self.socket_transport.is_reading()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.socket_transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self.socket_transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self.socket_transport.write_eof()

    def can_write_eof(self) -> bool:
        return self.socket_transport.can_write_eof()

    def abort(self) -> None:
        self.socket_transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.socket_transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self.socket_transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.socket_transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.socket_transport.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.socket_transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.socket_transport.get_protocol()


class BoundedH11Protocol(H11Protocol):
    """:class:`~uvicorn.protocols.http.h11_impl.H11Protocol` plus a header deadline and a
    lingering close of refused bodies.

    The bounds are class attributes: ``apd serve`` sets ``header_timeout_s`` for a single
    worker and exports ``APD_HEADER_TIMEOUT_S``, read here at import, for worker processes.
    """

    header_timeout_s: float = _from_env()
    linger_s: float = LINGER_S
    linger_max_bytes: int = LINGER_MAX_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._linger_deadline: asyncio.TimerHandle | None = None
        # the socket's transport, set in connection_made (declared as uvicorn declares its own)
        self._socket_transport: asyncio.Transport = None  # type: ignore[assignment]
        self._lingered_bytes = 0
        self.lingering = False
        self.app = self._close_if_body_unread(self.app)

    # --- connection events -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._socket_transport = transport
        super().connection_made(_LingeringTransport(transport, self))
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if not self.lingering:
            super().data_received(data)
            return
        self._lingered_bytes += len(data)
        if self._lingered_bytes > self.linger_max_bytes:
            self._stop_lingering()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        if self._linger_deadline is not None:
            self._linger_deadline.cancel()
            self._linger_deadline = None
        self.lingering = False
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server is stopping (SIGTERM): a connection whose request body is still
        arriving is closed now (its request has nothing to finish; the client may retry
        elsewhere), so a stalled client cannot hold the shutdown; requests whose bodies are
        in finish (bounded by ``--shutdown-grace-s``); idle connections close."""
        if (
            self.cycle is not None
            and not self.cycle.response_complete
            and self.conn.their_state is h11.SEND_BODY
        ):
            self._socket_transport.close()
            return
        super().shutdown()

    # --- closing ---------------------------------------------------------------------------

    def close_connection(self) -> None:
        """What ``transport.close()`` does here: a lingering close while the client is still
        sending a body that the (complete) response did not wait for, else a plain close."""
        socket_transport = self._socket_transport
        if self.lingering:
            self._stop_lingering()
        elif (
            self.conn.their_state is h11.SEND_BODY
            and self.conn.our_state in (h11.MUST_CLOSE, h11.CLOSED)
            and not socket_transport.is_closing()
            and socket_transport.can_write_eof()
        ):
            self._start_lingering()
        else:
            socket_transport.close()

    def _start_lingering(self) -> None:
        self.lingering = True
        self._disarm_header_deadline()
        self._unset_keepalive_if_required()
        socket_transport = self._socket_transport
        socket_transport.write_eof()  # after what is buffered: the client reads the answer
        socket_transport.resume_reading()  # until the client's end of stream closes it
        # (eof_received returns None), or the deadline, or too many bytes
        self._linger_deadline = self.loop.call_later(self.linger_s, self._stop_lingering)

    def _stop_lingering(self) -> None:
        self.lingering = False
        if self._linger_deadline is not None:
            self._linger_deadline.cancel()
            self._linger_deadline = None
        self._socket_transport.close()

    def _close_if_body_unread(self, app: ASGIApp) -> ASGIApp:
        """``app`` whose responses get ``Connection: close`` when they start before the
        request body is in (the connection then closes, lingering, rather than reading the
        rest of the body to reach a next request)."""

        async def app_closing_if_body_unread(scope: Scope, receive: Receive, send: Send) -> None:
            async def send_closing_if_body_unread(message: Message) -> None:
                if (
                    message["type"] == "http.response.start"
                    and self.conn.their_state is h11.SEND_BODY
                ):
                    headers = list(message.get("headers", ()))
                    if _CLOSE not in [(k.lower(), v.lower()) for k, v in headers]:
                        message = {**message, "headers": [*headers, _CLOSE]}
                await send(message)

            await app(scope, receive, send_closing_if_body_unread)

        return app_closing_if_body_unread

    # --- header deadline -------------------------------------------------------------------

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

"""Logging for ``apd serve``: one JSON object per line (or a plain-text line), request ids.

:func:`log_config` builds the ``logging.config.dictConfig`` dictionary that ``apd serve``
hands to uvicorn (``log_config=``), so uvicorn applies it in the server process and again in
every worker it starts. It covers the service's own loggers (``apd.*``), uvicorn's error log
(``uvicorn.error``, on stderr, as uvicorn does), uvicorn's access log (``uvicorn.access``, on
stdout) and anything else that logs (the root logger, from ``WARNING``).

A JSON line holds ``timestamp`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
``message`` and ``pid``; while a request is served, ``request_id`` (the request's
``X-Request-ID``, see :class:`service.api.middleware.RequestIdMiddleware`); on an access line
also ``client``, ``method``, ``path`` (with the query string), ``http_version``, ``status``
and ``duration_ms`` (from the request reaching the app to its response's headers, which is
when uvicorn writes the line; every response of this API is one JSON or binary body, sent
right after). A traceback is ``exc_info``; ``extra=`` fields of a record are kept.

The request id reaches the records through a context variable, set for the duration of a
request by the middleware and read when a record is handled (:class:`RequestContextFilter`,
on every handler): uvicorn runs each request in its own task, and writes its access line and
its "Exception in ASGI application" line from that task.

Written here rather than taken from python-json-logger: the formatter is a few lines of
``json.dumps``, and what the service needs beyond it (the request context, uvicorn's access
record's fields, a text twin of the same fields) would be written here either way.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

JSON: Final = "json"
TEXT: Final = "text"
ACCESS_LOGGER: Final = "uvicorn.access"
# uvicorn's access record: logger.info('%s - "%s %s HTTP/%s" %d', client, method, path,
# http_version, status) (uvicorn.protocols.http.*_impl).
_ACCESS_FIELDS: Final = ("client", "method", "path", "http_version", "status")
# What every LogRecord carries; anything else on a record came through ``extra=``.
_RECORD_ATTRS: Final = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's coloured duplicate of some messages
    "request_id",
    "duration_ms",
    *_ACCESS_FIELDS,
}


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    started: float  # time.perf_counter() when the request reached the app


_REQUEST: ContextVar[RequestContext | None] = ContextVar("apd_request", default=None)


def bind_request(request_id: str) -> Token[RequestContext | None]:
    """Make ``request_id`` the current request's id (until :func:`unbind_request`)."""
    return _REQUEST.set(RequestContext(request_id, time.perf_counter()))


def unbind_request(token: Token[RequestContext | None]) -> None:
    _REQUEST.reset(token)


def current_request_id() -> str | None:
    ctx = _REQUEST.get()
    return None if ctx is None else ctx.request_id


class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` (while a request is served) and, to uvicorn's access records, the
    fields of the access line and ``duration_ms``. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _REQUEST.get()
        if ctx is not None and not hasattr(record, "request_id"):
            record.request_id = ctx.request_id
        args = record.args
        if record.name == ACCESS_LOGGER and isinstance(args, tuple) and len(args) == 5:
            for name, value in zip(_ACCESS_FIELDS, args, strict=True):
                setattr(record, name, value)
            if ctx is not None:
                record.duration_ms = round((time.perf_counter() - ctx.started) * 1000, 3)
        return True


def _timestamp(created: float) -> str:
    when = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return when.removesuffix("+00:00") + "Z"


def _context_fields(record: logging.LogRecord) -> dict[str, Any]:
    """request_id, the access fields and duration_ms, where the record has them."""
    names = ("request_id", *_ACCESS_FIELDS, "duration_ms")
    return {name: getattr(record, name) for name in names if hasattr(record, name)}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in a message or traceback are
    escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage().rstrip("\n"),
            "pid": record.process if record.process is not None else os.getpid(),
        }
        out.update(_context_fields(record))
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out.setdefault(key, value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``<timestamp> <LEVEL> <logger> [<request id>] <message>`` (and the duration of an
    access line), for reading in a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _context_fields(record)
        line = f"{_timestamp(record.created)} {record.levelname:<8} {record.name}"
        if "request_id" in fields:
            line += f" [{fields['request_id']}]"
        line += f" {record.getMessage().rstrip()}"
        if "duration_ms" in fields:
            line += f" {fields['duration_ms']:.1f} ms"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def log_config(level: str, log_format: str = JSON) -> dict[str, Any]:
    """The ``dictConfig`` dictionary for uvicorn's ``log_config``: ``level`` (a
    :class:`service.config.LogLevel` value) for the service's and uvicorn's loggers,
    ``log_format`` ``"json"`` or ``"text"``."""
    if log_format not in (JSON, TEXT):
        raise ValueError(f"log_format must be {JSON!r} or {TEXT!r}, not {log_format!r}")
    formatter = JsonFormatter if log_format == JSON else TextFormatter
    level = level.upper()

    def handler(stream: str) -> dict[str, Any]:
        return {
            "class": "logging.StreamHandler",
            "stream": stream,
            "formatter": log_format,
            "filters": ["request_context"],
        }

    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_context": {"()": f"{__name__}.RequestContextFilter"}},
        "formatters": {log_format: {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {"default": handler("ext://sys.stderr"), "access": handler("ext://sys.stdout")},
        "loggers": {
            "apd": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            ACCESS_LOGGER: {"handlers": ["access"], "level": level, "propagate": False},
        },
        "root": {"handlers": ["default"], "level": "WARNING"},
    }

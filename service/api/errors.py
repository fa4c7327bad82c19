"""Error responses: every client mistake is a 4xx whose message names the field and problem.

Every error of the service's own routes has one shape (:class:`~service.codecs.schemas.ErrorBody`,
docs/api.md): FastAPI's ``detail``, a list of ``{type, loc, msg}``, and ``message``, one line
that says what is wrong and what to do. A 422 lists the first :data:`MAX_ERRORS` problems (the
offending input is not echoed back: it may be a whole image); any other status lists one. The
Open Inference Protocol's routes (``/v2/...``) answer ``{"error": message}``, as that protocol
says (:func:`error_content` picks by path).
"""

from __future__ import annotations

import logging
from typing import Any, Final

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service.codecs.schemas import ErrorBody
from service.core.limits import Limit, LimitExceeded
from service.core.model import DeadlineExceeded, NonFiniteAnswer, UnknownScore
from service.core.repository import ModelNotFound, ModelUnavailable, NoDefaultModel

MAX_ERRORS: Final = 20
log = logging.getLogger("apd.service")

# The ``type`` of the one ``detail`` item of an error that is not a 422.
ERROR_TYPES: Final[dict[int, str]] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "too_large",
    415: "unsupported_media_type",
    431: "headers_too_large",
    500: "server_error",
    503: "unavailable",
    504: "deadline_exceeded",
}
JSON_MEDIA_TYPE: Final = "application/json"
FORM_MEDIA_TYPE: Final = "multipart/form-data"


def is_v2(path: str) -> bool:
    """Whether ``path`` is an Open Inference Protocol route (its errors are ``{"error"}``)."""
    return path == "/v2" or path.startswith("/v2/")


def error_content(
    path: str, status: int, message: str, loc: tuple[str | int, ...] = ()
) -> dict[str, Any]:
    """The body of an error answer to a request for ``path``: ``{"error": message}`` under
    ``/v2``, else ``{"detail": [{type, loc, msg}], "message": message}``."""
    if is_v2(path):
        return {"error": message}
    kind = ERROR_TYPES.get(status, "client_error" if status < 500 else "server_error")
    return {"detail": [{"type": kind, "loc": list(loc), "msg": message}], "message": message}


def media_type(content_type: str | None) -> str:
    """``Content-Type``'s media type, lower case, without parameters ("" when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json_media_type(content_type: str | None) -> bool:
    """JSON as FastAPI reads it: ``application/json`` or ``application/*+json`` (FastAPI reads
    a body without Content-Type as no JSON at all)."""
    kind = media_type(content_type)
    return kind == JSON_MEDIA_TYPE or (kind.startswith("application/") and kind.endswith("+json"))


def unsupported_media_type(content_type: str | None, expected: str, hint: str) -> HTTPException:
    """415 for a body of another media type than ``expected``, saying how to send it."""
    return HTTPException(
        status_code=415, detail=f"{body_is(content_type)}; this endpoint takes {expected} ({hint})"
    )


def body_is(content_type: str | None) -> str:
    """``body is text/plain``, or ``body has no Content-Type``."""
    kind = media_type(content_type)
    return f"body is {kind}" if kind else "body has no Content-Type"


def _where(loc: Any) -> str:
    out = ""
    for part in loc if isinstance(loc, list | tuple) else [loc]:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


# The tags of an example's two forms (service.codecs.inputs: flat or nested), which pydantic puts in
# an error's location; the client wrote neither.
_FORM_TAGS: Final = frozenset({"flat", "nested"})


def client_loc(loc: Any) -> list[str | int]:
    """An error location in the client's names: ``body, inputs, 0, 0`` for the first value of
    the first example, never pydantic's ``inputs, 0, flat, 0``."""
    parts = [p if isinstance(p, int) else str(p) for p in (loc or ())]
    return [
        p
        for j, p in enumerate(parts)
        if not (
            p in _FORM_TAGS and j >= 2 and isinstance(parts[j - 1], int) and "inputs" in parts[:j]
        )
    ]


def _one_line(error: dict[str, Any]) -> str:
    loc = error["loc"]
    where = _where(loc[1:] if loc[:1] == ["body"] else loc)
    msg = str(error["msg"])
    return msg if msg.startswith(where) else f"{where}: {msg}"


def validation_error(field: str, message: str, kind: str, value: Any) -> RequestValidationError:
    """A 422 about body field ``field``, in the same shape as pydantic's own errors."""
    return RequestValidationError(
        [{"type": kind, "loc": ("body", field), "msg": message, "input": value}]
    )


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    detail = []
    for err in errors[:MAX_ERRORS]:
        item: dict[str, Any] = {
            "type": str(err.get("type", "value_error")),
            "loc": client_loc(err.get("loc", ())),
            "msg": str(err.get("msg", "")),
        }
        ctx = err.get("ctx")
        if isinstance(ctx, dict):
            item["ctx"] = {
                k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in ctx.items()
            }
        detail.append(item)
    if detail and detail[0]["type"] == "json_invalid":
        pos = detail[0]["loc"][-1]
        reason = detail[0].get("ctx", {}).get("error", "invalid JSON")
        summary = f"body is not valid JSON: {reason} at position {pos}"
        return JSONResponse(status_code=422, content={"detail": detail, "message": summary})
    summary = "; ".join(_one_line(d) for d in detail[:3])
    if len(errors) > 3:
        summary += f" (and {len(errors) - 3} more error(s))"
    return JSONResponse(status_code=422, content={"detail": detail, "message": summary})


BODY_PARSE_FAILED: Final = "There was an error parsing the body"


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Every HTTP error in the shape of :func:`error_content`; a body FastAPI could not parse
    (not UTF-8, nested too deeply; a broken multipart form) is a malformed body like any other:
    422, not 400."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400 and request.headers.get("content-type", "").startswith(
        "multipart/form-data"
    ):  # python-multipart's refusal, e.g. "Missing boundary in multipart."
        message = f"body is not a valid multipart form: {exc.detail}"
        detail = [{"type": "form_invalid", "loc": ["body"], "msg": message}]
        return JSONResponse(status_code=422, content={"detail": detail, "message": message})
    if exc.status_code == 400 and exc.detail == BODY_PARSE_FAILED:
        message = "body is not valid JSON: it could not be decoded (UTF-8 JSON expected)"
        detail = [{"type": "json_invalid", "loc": ["body"], "msg": message}]
        return JSONResponse(status_code=422, content={"detail": detail, "message": message})
    if not isinstance(exc.detail, str) or exc.status_code < 400:
        return await http_exception_handler(request, exc)
    message = exc.detail
    path = request.url.path
    if exc.status_code == 405 and exc.detail == "Method Not Allowed":  # routing's own words
        allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "")
        message = f"{request.method} is not allowed on {path}; use {allowed or 'another method'}"
    elif exc.status_code == 404 and exc.detail == "Not Found":
        message = f"no endpoint at {path}; the API is listed at /docs (or /openapi.json)"
    loc: tuple[str, ...] = ("body",) if exc.status_code in (408, 413, 415) else ()
    return JSONResponse(
        status_code=exc.status_code,
        content=error_content(path, exc.status_code, message, loc),
        headers=exc.headers,
    )


# The core's refusals (service.core): status, the body field they are about, pydantic-like type.
CORE_ERRORS: Final[dict[type[Exception], tuple[int, str, str]]] = {
    UnknownScore: (422, "score", "enum"),
    NoDefaultModel: (422, "model", "missing"),
    ModelNotFound: (404, "model", "not_found"),
    ModelUnavailable: (503, "model", "unavailable"),
    DeadlineExceeded: (504, "", "deadline_exceeded"),
    NonFiniteAnswer: (500, "", "nonfinite_answer"),
}
_LIMITS: Final[dict[Limit, tuple[int, str, str]]] = {
    Limit.NUM_SAMPLES: (422, "num_samples", "less_than_equal"),
    Limit.BATCH: (413, "inputs", "too_large"),
    Limit.IMAGE_PIXELS: (413, "files", "too_large"),
}


def core_error(exc: Exception) -> tuple[int, str, str]:
    """``(status, field, type)`` of a refusal of the serving core."""
    if isinstance(exc, LimitExceeded):
        return _LIMITS[exc.limit]
    for kind, answer in CORE_ERRORS.items():
        if isinstance(exc, kind):
            return answer
    raise TypeError(f"not an error of the core: {exc!r}")


async def core_error_handler(request: Request, exc: Exception) -> Response:
    """A refusal of the serving core in the shape of :func:`error_content` (a 422 names its
    body field as pydantic would); a 5xx is logged."""
    status, field, kind = core_error(exc)
    message = str(exc)
    path = request.url.path
    if is_v2(path) and status == 422:
        status = 400  # the protocol's status for a request the model cannot take
    if status >= 500:
        log.error("%s: %s", path, message)
    if is_v2(path) or status != 422:
        loc: tuple[str, ...] = ("body", field) if field and status != 404 else ()
        return JSONResponse(status_code=status, content=error_content(path, status, message, loc))
    detail = [{"type": kind, "loc": ["body", field], "msg": message}]
    return JSONResponse(status_code=422, content={"detail": detail, "message": message})


ERROR_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    408: {"model": ErrorBody, "description": "The request body arrived too slowly"},
    413: {
        "model": ErrorBody,
        "description": "Body over max_body_bytes (refused before it is read when its "
        "Content-Length says so) or batch over max_batch",
    },
    415: {
        "model": ErrorBody,
        "description": "A body of another media type than the endpoint's (application/json; "
        "multipart/form-data for /predict/image), named in the message",
    },
    422: {
        "model": ErrorBody,
        "description": "A field is missing, mistyped or out of range",
    },
    404: {"model": ErrorBody, "description": "No such model or version"},
    431: {"model": ErrorBody, "description": "Request headers over max_header_bytes"},
    503: {
        "model": ErrorBody,
        "description": "The service is starting, the model has no READY version, or the "
        "worker's memory budget stayed full for admission_wait_s (with Retry-After)",
    },
    504: {"model": ErrorBody, "description": "The answer took longer than request_timeout_s"},
}

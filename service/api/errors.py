"""Error responses: every client mistake is a 4xx whose message names the field and problem.

422 keeps FastAPI's shape (``detail``: a list of ``{loc, msg, type}``) and adds ``message``,
one line summarising the first errors. The offending input is not echoed back (it may be a
whole image), and the list is cut at :data:`MAX_ERRORS`. Other errors are ``{"detail": str}``.
"""

from __future__ import annotations

from typing import Any, Final

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service.schemas import ErrorMessage, ValidationErrorBody

MAX_ERRORS: Final = 20


def _where(loc: Any) -> str:
    out = ""
    for part in loc if isinstance(loc, list | tuple) else [loc]:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


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
            "loc": [p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
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
    """FastAPI's own handler, except that a body FastAPI could not parse (not UTF-8, nested
    too deeply; a broken multipart form) is a malformed body like any other: 422, not 400."""
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
    return await http_exception_handler(request, exc)


ERROR_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    408: {"model": ErrorMessage, "description": "The request body arrived too slowly"},
    413: {
        "model": ErrorMessage,
        "description": "Body over max_body_bytes (refused before it is read when its "
        "Content-Length says so) or batch over max_batch",
    },
    422: {
        "model": ValidationErrorBody,
        "description": "A field is missing, mistyped or out of range",
    },
    431: {"model": ErrorMessage, "description": "Request headers over max_header_bytes"},
    503: {
        "model": ErrorMessage,
        "description": "The service is starting, or the worker's memory budget stayed full for "
        "admission_wait_s (with Retry-After)",
    },
}

"""Routes whose inputs are examples of the served model: read and validated for that model.

FastAPI parses a JSON body with ``await request.json()`` and then validates it against the
route's body model. :class:`InputBatchRoute` hands the route a request whose ``json()`` is
:func:`~service.codecs.inputs.parse_json_body` (orjson, and the batch checked whole with NumPy),
FastAPI's documented way to change how a body is read, and validates the body with the served
model's input schema (:func:`~service.codecs.inputs.serving`) of the model version the body
names. The body parameter and its model stay
as they are, so the OpenAPI document describes the same request bodies. Before the checkpoint
is loaded there is no schema to validate with: 503.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import anyio.to_thread
from fastapi import HTTPException, Request, Response, params
from fastapi.routing import APIRoute

from service.api.deps import NOT_READY, get_repository_or_none
from service.api.errors import (
    FORM_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    is_json_media_type,
    media_type,
    unsupported_media_type,
)
from service.codecs.inputs import InputSchema, named_model, parse_json_body, schema_of, serving


class InputBatchRequest(Request):
    """A request whose JSON body is parsed by :func:`~service.codecs.inputs.parse_json_body`."""

    schema: InputSchema | None = None

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = await anyio.to_thread.run_sync(parse_json_body, body, self.schema)
        return self._json


class InputBatchRoute(APIRoute):
    """An API route whose body is read as an :class:`InputBatchRequest` and validated with
    the input schema of the model version it names (``"model"``, ``"version"``; default: the
    default model's highest READY version), resolved once here for the route
    (:func:`service.api.deps.get_model`). Image forms name theirs in form fields: the route
    resolves it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        form = isinstance(getattr(self.body_field, "field_info", None), params.Form)

        def check_media_type(request: Request) -> None:
            """415 for a body of another media type than the route's (JSON, or a form)."""
            content_type = request.headers.get("content-type")
            if form and media_type(content_type) != FORM_MEDIA_TYPE:
                hint = "send the images as files, e.g. curl -F files=@digit.png"
                raise unsupported_media_type(content_type, FORM_MEDIA_TYPE, hint)
            if not form and not is_json_media_type(content_type):
                hint = "send the JSON body with Content-Type: application/json"
                raise unsupported_media_type(content_type, JSON_MEDIA_TYPE, hint)

        async def handle_input_batch(request: Request) -> Response:
            check_media_type(request)
            repository = get_repository_or_none(request)
            if repository is None:
                await request.body()  # its limits answer first (413, 408), as on every route
                raise HTTPException(status_code=503, detail=NOT_READY)
            if form:
                return await handle(request)
            body = await request.body()
            name, version = await anyio.to_thread.run_sync(named_model, body)
            model = repository.resolve(name, version)
            request.state.served_model = model
            schema = schema_of(model.checkpoint)
            wrapped = InputBatchRequest(request.scope, request.receive)
            wrapped._body = body  # read once (Starlette's own cache of it)
            wrapped.schema = schema
            with serving(schema):
                return await handle(wrapped)

        return handle_input_batch

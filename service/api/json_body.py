"""Routes whose JSON bodies are read by :func:`service.schemas.parse_json_body`.

FastAPI parses a JSON body with ``await request.json()`` and then validates it against the
route's body model. :class:`ImageBatchRoute` hands the route a request whose ``json()`` is
:func:`~service.schemas.parse_json_body` (orjson, and the image batch checked whole with
NumPy), FastAPI's documented way to change how a body is read. The body parameter and its
model stay as they are, so the OpenAPI document describes the same request bodies.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.schemas import parse_json_body


class ImageBatchRequest(Request):
    """A request whose JSON body is parsed by :func:`~service.schemas.parse_json_body`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class ImageBatchRoute(APIRoute):
    """An API route that reads its JSON body as an :class:`ImageBatchRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_image_batch(request: Request) -> Response:
            return await handle(ImageBatchRequest(request.scope, request.receive))

        return handle_image_batch

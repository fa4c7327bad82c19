"""Swagger UI at ``/docs`` and ReDoc at ``/redoc``, with every asset served by the app itself.

FastAPI's own docs pages load Swagger UI and ReDoc from a CDN (and ReDoc's fonts from Google),
so without internet they are blank. Here the JavaScript, CSS and favicon come from the
``fastapi-offline`` package (in the ``serve`` extras), mounted at ``/docs/assets``; the pages
name no other host. Swagger UI's online validator (which would send the document's URL to
validator.swagger.io) is switched off, and ReDoc's bundle is served with its one remote image
(the Redocly logo, fetched from cdn.redoc.ly) replaced by an empty one, which ReDoc hides: no
page the app serves makes a request to another host (tests/test_page_browser.py).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Final

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

DOCS_URL: Final = "/docs"
REDOC_URL: Final = "/redoc"
ASSETS_URL: Final = "/docs/assets"
ASSETS_DIR: Final = Path(fastapi_offline.__file__).parent / "static"
SWAGGER_JS: Final = "swagger-ui-bundle.js"
SWAGGER_CSS: Final = "swagger-ui.css"
REDOC_JS: Final = "redoc.standalone.js"
FAVICON: Final = "favicon.png"
ASSETS: Final = (SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON)
# ReDoc's bundle as served: outside the assets' mount, its remote logo removed.
REDOC_OFFLINE_URL: Final = "/docs/redoc.standalone.js"
REDOC_REMOTE_LOGO: Final = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_IMAGE: Final = b"data:,"  # not an image: ReDoc's onError hides the logo


@cache
def redoc_bundle() -> bytes:
    """ReDoc's standalone bundle without its remote logo."""
    return (ASSETS_DIR / REDOC_JS).read_bytes().replace(REDOC_REMOTE_LOGO, EMPTY_IMAGE)


def add_offline_docs(app: FastAPI) -> None:
    """Serve the docs pages and their assets. ``app`` must be built with ``docs_url=None`` and
    ``redoc_url=None`` (FastAPI's CDN pages)."""
    missing = [name for name in ASSETS if not (ASSETS_DIR / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline lacks the docs assets {missing} in {ASSETS_DIR}")
    if app.openapi_url is None:
        raise RuntimeError("the docs pages need the OpenAPI document (openapi_url is None)")
    openapi_url = app.openapi_url
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    def asset(request: Request, name: str) -> str:
        # Behind a proxy that strips a path prefix, root_path keeps the URLs right.
        return f"{request.scope.get('root_path', '')}{ASSETS_URL}/{name}"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=request.scope.get("root_path", "") + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=asset(request, SWAGGER_JS),
            swagger_css_url=asset(request, SWAGGER_CSS),
            swagger_favicon_url=asset(request, FAVICON),
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None},
        )

    @app.get(REDOC_OFFLINE_URL, include_in_schema=False)
    async def redoc_js() -> Response:
        return Response(redoc_bundle(), media_type="text/javascript")

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=request.scope.get("root_path", "") + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=request.scope.get("root_path", "") + REDOC_OFFLINE_URL,
            redoc_favicon_url=asset(request, FAVICON),
            with_google_fonts=False,
        )

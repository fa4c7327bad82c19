"""``GET /``: a page to try the model in a browser (``service/static/``).

An image, uploaded or drawn, is sent as it is to ``POST /predict/image``, where the server
makes the model's input from it (:mod:`service.codecs.images`, the one preparation of the page and
the API); the answer is drawn by the page's own script. Plain HTML, CSS and JavaScript served
from here, with a Content-Security-Policy that lets the page load and connect to nothing but
this server, so it works offline and behind a path prefix (its URLs are relative).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR: Final = Path(__file__).resolve().parents[2] / "static"
PAGE: Final = "index.html"
ASSETS_URL: Final = "/page"
# The page's assets and their media types: nothing else under STATIC_DIR is served.
ASSETS: Final = {"page.js": "text/javascript", "page.css": "text/css"}
# Only this server: scripts and styles from its files, requests to its API, images from the
# user's own file (blob:) and canvases.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidated (ETag) so an upgrade shows at once
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / PAGE, media_type="text/html", headers=HEADERS)


@router.get(ASSETS_URL + "/{name}")
async def page_asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail=f"no page asset {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=HEADERS)

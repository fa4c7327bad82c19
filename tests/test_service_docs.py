"""The docs pages (``/docs`` Swagger UI, ``/redoc`` ReDoc) work offline: their HTML names no
host but the app's own, and every asset they reference is served by the app with the right
content type (service/api/docs.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.docs import ASSETS_URL, DOCS_URL, REDOC_OFFLINE_URL, REDOC_URL
from service.config import Settings
from tests.service_support import make_checkpoint

CONTENT_TYPES = {
    ".js": {"text/javascript", "application/javascript"},
    ".css": {"text/css"},
    ".png": {"image/png"},
}
# What each page must load to render, and a marker that the file is that library.
PAGE_ASSETS = {
    DOCS_URL: {"swagger-ui-bundle.js": "SwaggerUIBundle", "swagger-ui.css": ".swagger-ui"},
    REDOC_URL: {"redoc.standalone.js": "Redoc"},
}


class _Refs(HTMLParser):
    """Every ``src``/``href`` attribute and ``spec-url`` of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"src", "href", "spec-url"} and value:
                self.urls.append(value)


def page_urls(html: str) -> list[str]:
    """The URLs a page loads: tag attributes, and Swagger UI's ``url: '...'`` setting."""
    parser = _Refs()
    parser.feed(html)
    return parser.urls + re.findall(r"\burl:\s*'([^']*)'", html)


def external_refs(html: str) -> list[str]:
    """Anything in the page that points at another host: an absolute or protocol-relative URL."""
    found = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s'\"<>)]*", html, flags=re.I)
    return found + [u for u in page_urls(html) if urlsplit(u).netloc]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    ckpt = make_checkpoint(tmp_path_factory.mktemp("docs") / "model.safetensors")
    return create_app(Settings(checkpoint=ckpt, redis_url=None))


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("page", [DOCS_URL, REDOC_URL])
def test_docs_page_names_no_external_host(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert not external_refs(r.text), external_refs(r.text)
    assert "fonts.googleapis" not in r.text and "cdn" not in r.text.lower()


@pytest.mark.parametrize("page", [DOCS_URL, REDOC_URL])
def test_every_asset_a_docs_page_loads_is_served(client: TestClient, page: str) -> None:
    urls = page_urls(client.get(page).text)
    assert "/openapi.json" in urls
    assert client.get("/openapi.json").json()["openapi"].startswith("3.")
    assets = [u for u in urls if u != "/openapi.json"]
    for url in assets:
        assert url.startswith(ASSETS_URL + "/") or url == REDOC_OFFLINE_URL, url
        r = client.get(url)
        assert r.status_code == 200, url
        ctype = r.headers["content-type"].split(";")[0]
        assert ctype in CONTENT_TYPES[Path(url).suffix], (url, ctype)
        assert len(r.content) > 1000, url
    names = {Path(u).name: u for u in assets}
    for name, marker in PAGE_ASSETS[page].items():
        assert name in names, f"{page} does not load {name}"
        assert marker in client.get(names[name]).text, name
    assert "favicon.png" in names


def test_swagger_ui_online_validator_is_off(client: TestClient) -> None:
    # Swagger UI would otherwise send the document's URL to validator.swagger.io.
    assert '"validatorUrl": null' in client.get(DOCS_URL).text


def test_redoc_is_served_without_its_remote_logo(client: TestClient) -> None:
    """ReDoc's bundle fetches the Redocly logo from cdn.redoc.ly; the app serves it without."""
    [url] = [u for u in page_urls(client.get(REDOC_URL).text) if u.endswith(".js")]
    bundle = client.get(url).text
    assert "Redoc" in bundle and "cdn.redoc.ly" not in bundle
    assert "cdn.redoc.ly" in client.get(f"{ASSETS_URL}/redoc.standalone.js").text  # control


def test_docs_urls_follow_root_path(app: FastAPI) -> None:
    """Behind a proxy that strips /apd, the page must ask for /apd/docs/assets/..."""
    with TestClient(app, root_path="/apd") as c:
        urls = page_urls(c.get(DOCS_URL).text)
    assert urls and all(u.startswith("/apd/") for u in urls), urls


def test_docs_routes_stay_out_of_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith(("/docs", "/redoc"))]


def test_the_check_catches_fastapi_cdn_pages() -> None:
    """Control: FastAPI's default pages load from a CDN, and the check above says so."""
    cdn = FastAPI()
    with TestClient(cdn) as c:
        for page in (DOCS_URL, REDOC_URL):
            refs: list[Any] = external_refs(c.get(page).text)
            assert refs, f"{page}: the CDN page passed the offline check"

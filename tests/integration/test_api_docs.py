"""The docs pages of a real `cq api` work air-gapped: every asset comes from the API itself.

Swagger UI (/docs) and ReDoc (/redoc) are HTML shells that load JavaScript, CSS
and a favicon; if any of them lives on another host, the page is blank on a
cluster without internet. The pages stay open without an API key, like /healthz.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from completion_queue import EmbeddedRedis, Settings, free_port, worker_env
from tests.conftest import until

KEY = "docs-test-key"
PAGES = ["/docs", "/redoc"]
#: Any absolute or protocol-relative URL, wherever it sits in the page (attributes, scripts, styles).
ABSOLUTE_URL = re.compile(r"""(?:\b[a-z][a-z0-9+.-]*:)?//[^\s'"<>)]+""", re.IGNORECASE)
#: The spec URL handed to Swagger UI in its inline script: ``url: '/openapi.json'``.
SCRIPT_URL = re.compile(r"""\burl\s*:\s*['"]([^'"]+)['"]""")
#: What each kind of asset must be served as.
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "json"}


@dataclass
class DocsApi:
    """A running `cq api` with API keys configured, and a client that sends no key."""

    url: str
    http: httpx.Client


@pytest.fixture(scope="module")
def docs_api(
    redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DocsApi]:
    # No worker is needed: the docs read nothing but the app's own schema.
    tmp = tmp_path_factory.mktemp("api-docs")
    settings = Settings(broker_url=f"redis://127.0.0.1:{redis_server.port}/3", data_dir=tmp)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "api.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "api", "--port", str(port)],
            env={**os.environ, **worker_env(settings), "CQ_API_KEYS": KEY},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    with httpx.Client(base_url=url, timeout=30) as http:
        until(lambda: _healthy(http) or process.poll() is not None, timeout_s=60)
        assert process.poll() is None, log.read_text()
        yield DocsApi(url=url, http=http)
    process.terminate()
    process.wait(30)


def _healthy(http: httpx.Client) -> bool:
    try:
        return http.get("/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class _Links(HTMLParser):
    """Every URL an HTML page names in an attribute (src, href, spec-url, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and (name in ("src", "href", "action") or name.endswith("url")):
                self.urls.append(value)


def referenced_urls(html: str) -> list[str]:
    """The URLs of ``html``: its tags' attributes and the spec URL in its inline script."""
    parser = _Links()
    parser.feed(html)
    return parser.urls + SCRIPT_URL.findall(html)


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_references_no_outside_host(docs_api: DocsApi, page: str) -> None:
    # Given a `cq api` with API keys configured
    # When the docs page is fetched without a key
    response = docs_api.http.get(page)

    # Then it is the HTML shell, and every URL it names is on the API itself
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    urls = referenced_urls(response.text)
    assert any(url.endswith(".js") for url in urls), urls
    assert any(url.endswith("/openapi.json") for url in urls), urls
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"{page} loads {url} from another host"
    assert ABSOLUTE_URL.findall(response.text) == []


@pytest.mark.parametrize("page", PAGES)
def test_docs_assets_answer_without_a_key(docs_api: DocsApi, page: str) -> None:
    # Given the URLs a docs page names (scripts, styles, favicon, the schema)
    urls = referenced_urls(docs_api.http.get(page).text)
    suffixes = {Path(urlsplit(url).path).suffix for url in urls}
    assert {".js", ".png", ".json"} <= suffixes, urls

    for url in urls:
        # When each is fetched as the browser does, relative to the page, with no key
        absolute = urljoin(f"{docs_api.url}{page}", url)
        assert absolute.startswith(f"{docs_api.url}/"), f"{page} loads {absolute}"
        asset = docs_api.http.get(absolute)

        # Then it is served, as what it is, and is more than a stub
        assert asset.status_code == 200, f"{url}: {asset.status_code} {asset.text[:200]}"
        kind = CONTENT_TYPES[Path(urlsplit(url).path).suffix]
        assert kind in asset.headers["content-type"], f"{url}: {asset.headers['content-type']}"
        assert len(asset.content) > 1000, f"{url}: {len(asset.content)} bytes"
    if page == "/docs":
        assert any(url.endswith(".css") for url in urls), urls


def test_scripts_are_the_real_bundles(docs_api: DocsApi) -> None:
    # Given the scripts the two pages load
    scripts = {
        page: [url for url in referenced_urls(docs_api.http.get(page).text) if url.endswith(".js")]
        for page in PAGES
    }

    # When they are fetched
    swagger = docs_api.http.get(scripts["/docs"][0]).text
    redoc = docs_api.http.get(scripts["/redoc"][0]).text

    # Then they define what the pages call: SwaggerUIBundle and the ReDoc web component
    assert "SwaggerUIBundle" in swagger and len(swagger) > 500_000
    assert "Redoc" in redoc and len(redoc) > 500_000


def test_keys_guard_the_api_but_not_the_docs(docs_api: DocsApi) -> None:
    # Given a `cq api` whose keys are on: /v1 refuses a call without one
    assert docs_api.http.get("/v1/jobs").status_code == 401
    assert docs_api.http.get("/v1/jobs", headers={"Authorization": f"Bearer {KEY}"}).is_success

    # When the docs and the schema are fetched without a key
    # Then they answer, and the schema is the API's own
    for page in [*PAGES, "/docs/oauth2-redirect"]:
        assert docs_api.http.get(page).status_code == 200, page
    schema = docs_api.http.get("/openapi.json")
    assert schema.status_code == 200
    assert schema.json()["info"]["title"] == "completion-queue"
    assert "/v1/jobs" in schema.json()["paths"]

"""`/docs` works air-gapped: the page and every asset it references come from the server itself, never a CDN."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.server import Server, make_bundle

# Every URL a page or stylesheet names: src/href attributes, CSS url(...) and @import.
_REFERENCES = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\(\s*["']?([^"')]+)["']?\s*\)""")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("docs")
    srv = Server(["--bundle", str(make_bundle(folder / "bundle", "fake.yaml")), "--api-key", "k"])
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def references(text: str) -> list[str]:
    return [a or b for a, b in _REFERENCES.findall(text) if not (a or b).startswith(("data:", "#"))]


def test_docs_and_every_asset_it_references_come_from_the_server(server: Server) -> None:
    page = httpx.get(f"{server.url}/docs")  # open, with an API key set, as the probes are
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = references(page.text)
    assert {"docs/swagger-ui.css", "docs/swagger-ui-bundle.js"} <= set(assets)
    fetched: dict[str, httpx.Response] = {}
    pending = [urljoin(f"{server.url}/docs", a) for a in assets]
    while pending:
        url = pending.pop()
        assert urlsplit(url).netloc == urlsplit(server.url).netloc, f"/docs references another host: {url}"
        if url in fetched:
            continue
        fetched[url] = response = httpx.get(url)
        assert response.status_code == 200, url
        if response.headers["content-type"].startswith("text/css"):
            pending += [urljoin(url, a) for a in references(response.text)]
    bundle = fetched[f"{server.url}/docs/swagger-ui-bundle.js"]
    assert bundle.headers["content-type"].startswith("text/javascript") and "SwaggerUIBundle" in bundle.text
    assert "openapi.json" in page.text and httpx.get(f"{server.url}/openapi.json").status_code == 200


def test_only_the_listed_assets_are_served(server: Server) -> None:
    for path in ("/docs/index.html", "/docs/..%2F..%2Fetc%2Fpasswd", "/docs/swagger-ui.js.map"):
        response = httpx.get(f"{server.url}{path}", headers={"authorization": "Bearer k"})
        assert response.status_code == 404 and response.json()["detail"]["code"] == "NOT_FOUND", path


def test_the_assets_ship_in_the_package_and_not_in_our_tree() -> None:
    from sie_router.api import openapi

    # Each asset is a file of the installed distribution (its RECORD), and none is in our tree: never copied by hand.
    dist = importlib.metadata.distribution("swagger-ui-bundle-v2")
    shipped = {Path(dist.locate_file(f)).resolve() for f in dist.files or []}
    assert all((openapi.SWAGGER_UI / name).resolve() in shipped for name in openapi.DOCS_ASSETS)
    ours = subprocess.run(["git", "ls-files"], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, check=True).stdout.split()
    assert not [f for f in ours if Path(f).name in openapi.DOCS_ASSETS]

"""TEI routes behind `--api-key`: TEI's bare 401 (empty body, no WWW-Authenticate); its probes stay open."""

from __future__ import annotations

import httpx

from tests.hardening.conftest import Hardened
from tests.server import MINILM


def test_tei_routes_need_the_key_and_refuse_as_tei_does(hardened: Hardened) -> None:
    for path in ("/embed", f"/tei/{MINILM}/embed", f"/tei/{MINILM}"):
        refused = httpx.post(f"{hardened.url}{path}", json={"inputs": "a"},
                             headers={"authorization": "Bearer hf_a_users_hub_token"})
        assert (refused.status_code, refused.content) == (401, b""), path
        assert "www-authenticate" not in refused.headers
        allowed = httpx.post(f"{hardened.url}{path}", json={"inputs": "a"}, headers=hardened.auth, timeout=60)
        assert allowed.status_code == 200 and len(allowed.json()[0]) == 384, path
    assert httpx.get(f"{hardened.url}/info").status_code == 401  # TEI's /info needs the key too
    for probe in ("/", "/ping", f"/tei/{MINILM}/health", f"/tei/{MINILM}/ping"):
        assert httpx.get(f"{hardened.url}{probe}").status_code == 200, probe

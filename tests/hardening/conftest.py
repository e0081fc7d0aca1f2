"""A server for the hardening tests: MiniLM and the fake models, an API key (given as a flag), an admin token (env)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.server import MINILM, Server, make_bundle


@dataclass
class Hardened:
    server: Server
    api_key: str
    admin_token: str
    log: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}

    @property
    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_token}"}


@pytest.fixture(scope="package")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hardened]:
    folder = tmp_path_factory.mktemp("hardened")
    api_key, admin_token = f"sk-{secrets.token_urlsafe(24)}", f"adm-{secrets.token_urlsafe(24)}"
    log = folder / "server.log"
    # SIE_LOAD_WAIT_S=1: OpenAI/Infinity routes naming a cold model answer 503 quickly instead of holding requests.
    bundle = make_bundle(folder / "bundle", "fake.yaml", "all-minilm-l6-v2.yaml")
    srv = Server(["--bundle", str(bundle), "--preload", "test/fake-dense", "--preload", MINILM, "--api-key", api_key,
                  "--log-level", "debug"],
                 env={"SIE_ADMIN_TOKEN": admin_token, "SIE_LOAD_WAIT_S": "1"}, log=log)
    try:
        srv.wait_ready()
        yield Hardened(srv, api_key, admin_token, log)
    finally:
        srv.stop()

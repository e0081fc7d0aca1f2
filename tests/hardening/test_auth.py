"""Access: the API key guards inference and listing routes, refusing in each API's envelope; the admin API takes only
its own token; probes stay open; secrets stay out of logs."""

from __future__ import annotations

import contextlib

import httpx
import openai
import psutil
import pytest

from sie_router.middleware.auth import Auth
from sie_router.settings import Settings
from sie_sdk import SIEClient
from sie_sdk.types import Item
from tests.hardening.conftest import Hardened

FAKE = "test/fake-dense"
# (method, path, body, envelope) for every protected route.
PROTECTED = [
    ("POST", f"/v1/encode/{FAKE}", {"items": [{"text": "hi"}]}, "native"),
    ("POST", f"/v1/score/{FAKE}", {"query": {"text": "q"}, "items": [{"text": "d"}]}, "native"),
    ("POST", f"/v1/extract/{FAKE}", {"items": [{"text": "hi"}], "params": {"labels": ["a"]}}, "native"),
    ("GET", "/v1/models", None, "native"),
    ("GET", f"/v1/models/{FAKE}", None, "native"),
    ("POST", "/v1/embeddings", {"model": FAKE, "input": "hi"}, "openai"),
    ("POST", "/v1/rerank", {"model": FAKE, "query": "q", "documents": ["d"]}, "openai"),
    ("POST", "/embeddings", {"model": FAKE, "input": "hi"}, "infinity"),
    ("POST", "/rerank", {"model": FAKE, "query": "q", "documents": ["d"]}, "infinity"),
    ("POST", "/classify", {"model": FAKE, "input": ["hi"]}, "infinity"),
    ("POST", "/v1/classify", {"model": FAKE, "input": ["hi"]}, "infinity"),
    ("GET", "/models", None, "infinity"),
]
OPEN = ["/healthz", "/readyz", "/health", "/openapi.json", "/docs"]


def call(hardened: Hardened, method: str, path: str, body: object, headers: dict[str, str]) -> httpx.Response:
    return httpx.request(method, f"{hardened.url}{path}", json=body, timeout=30,
                         headers={"accept": "application/json", **headers})


def assert_refused(response: httpx.Response, envelope: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    body = response.json()
    if envelope == "native":
        assert body["detail"]["code"] == "UNAUTHORIZED" and response.headers["x-sie-error-code"] == "UNAUTHORIZED"
    elif envelope == "openai":
        assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body == {"detail": "Unauthorized"}


@pytest.mark.parametrize(("method", "path", "body", "envelope"), PROTECTED, ids=[f"{m} {p}" for m, p, *_ in PROTECTED])
def test_protected_route_needs_the_key(hardened: Hardened, method: str, path: str, body: object,
                                       envelope: str) -> None:
    for headers in ({}, {"authorization": "Bearer wrong-key"}, {"authorization": f"Basic {hardened.api_key}"},
                    {"authorization": "Bearer"}, {"authorization": hardened.api_key}):
        assert_refused(call(hardened, method, path, body, headers), envelope)
    response = call(hardened, method, path, body, hardened.auth)
    if path.endswith("classify"):  # fake-dense is no classifier: refused by the handler, so auth let it through
        assert response.status_code == 400 and "classify" in response.text
    else:
        assert response.status_code == 200, response.text


def test_the_admin_token_does_not_open_inference_routes(hardened: Hardened) -> None:
    assert_refused(call(hardened, "GET", "/v1/models", None, hardened.admin), "native")


def test_admin_api_refuses_the_inference_key(hardened: Hardened) -> None:
    url = f"{hardened.url}/admin/workers"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer nope"}).status_code == 401
    refused = httpx.get(url, headers=hardened.auth)
    assert refused.status_code == 403 and refused.json()["detail"]["code"] == "FORBIDDEN"
    evict = httpx.post(f"{hardened.url}/admin/workers/{FAKE}/evict", headers=hardened.auth)
    assert evict.status_code == 403
    listed = httpx.get(url, headers=hardened.admin)
    assert listed.status_code == 200 and FAKE in {w["model"] for w in listed.json()["workers"]}


def test_admin_auth_is_checked_before_routing(hardened: Hardened) -> None:
    assert httpx.get(f"{hardened.url}/admin/no-such-route").status_code == 401
    assert httpx.get(f"{hardened.url}/admin/no-such-route", headers=hardened.auth).status_code == 403
    assert httpx.get(f"{hardened.url}/admin/no-such-route", headers=hardened.admin).status_code == 404
    # Unknown routes need the key too, so the route table is not probed for free.
    assert httpx.get(f"{hardened.url}/v2/secret").status_code == 401


@pytest.mark.parametrize("path", OPEN)
def test_probes_and_docs_stay_open(hardened: Hardened, path: str) -> None:
    assert httpx.get(f"{hardened.url}{path}").status_code == 200


def test_real_clients_send_the_key(hardened: Hardened) -> None:
    with SIEClient(hardened.url, api_key=hardened.api_key) as client:
        assert client.encode(FAKE, Item(text="hi"))["dense"].shape == (16,)
    good = openai.OpenAI(base_url=f"{hardened.url}/v1", api_key=hardened.api_key, max_retries=0)
    assert len(good.embeddings.create(model=FAKE, input="hi").data[0].embedding) == 16
    bad = openai.OpenAI(base_url=f"{hardened.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model=FAKE, input="hi")


def test_secrets_never_reach_the_log_or_the_command_line(hardened: Hardened) -> None:
    for headers in (hardened.auth, hardened.admin, {"authorization": "Bearer sk-attempted-guess"}):
        httpx.get(f"{hardened.url}/v1/models", headers=headers)
        httpx.get(f"{hardened.url}/admin/workers", headers=headers)
        httpx.post(f"{hardened.url}/v1/encode/{FAKE}", json={"items": [{"text": "x"}]}, headers=headers)
    text = hardened.log.read_text()
    assert "ready: serving" in text  # the log is really being written
    for secret in (hardened.api_key, hardened.admin_token, "sk-attempted-guess"):
        assert secret not in text
    # The key came as --api-key; the router overwrites its command line, which any local user can read.
    cmdline = " ".join(psutil.Process(hardened.server.process.pid).cmdline())
    assert "--api-key" in cmdline and hardened.api_key not in cmdline
    for child in hardened.server.children():
        with contextlib.suppress(psutil.NoSuchProcess):
            assert hardened.api_key not in " ".join(child.cmdline())


async def _app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("not reached by check()")


def _auth(settings: Settings) -> Auth:
    return Auth(_app, settings)


def test_admin_api_closes_when_only_an_api_key_is_set() -> None:
    refusal = _auth(Settings(api_key="k")).check("GET", "/admin/workers", b"k")
    assert refusal is not None and refusal.code == "FORBIDDEN" and "SIE_ADMIN_TOKEN" in refusal.message
    assert _auth(Settings(api_key="k")).check("GET", "/v1/models", b"k") is None
    assert _auth(Settings(api_key="k")).check("GET", "/healthz", None) is None
    assert _auth(Settings()).check("GET", "/admin/workers", None) is None
    assert _auth(Settings()).check("GET", "/v1/models", None) is None
    admin_only = _auth(Settings(admin_token="t"))
    assert admin_only.check("GET", "/v1/models", None) is None
    assert admin_only.check("GET", "/admin/workers", b"t") is None
    assert admin_only.check("GET", "/admin/workers", None) is not None

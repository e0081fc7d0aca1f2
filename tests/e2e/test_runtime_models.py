"""Models added and removed at runtime: `POST`, `DELETE` and `GET /admin/models`, `sie-admin models add/rm`, the
admin token, the model store across a restart, and pools that keep their registrations to themselves."""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sie_sdk import admin
from tests.server import Server, make_bundle

API_KEY, ADMIN = "key-1", "admin-1"
AUTH, ADMIN_AUTH = {"authorization": f"Bearer {API_KEY}"}, {"authorization": f"Bearer {ADMIN}"}


def flags(folder: Path, store: Path, *more: str) -> list[str]:
    return ["--bundle", str(make_bundle(folder / "bundle", "fake.yaml")), "-m", "test/fake-dense", "--api-key",
            API_KEY, "--admin-token", ADMIN, "--model-store", str(store), *more]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtime")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    srv = Server(flags(folder, folder / "store" / "models.json"))
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def models(server: Server) -> dict[str, dict[str, Any]]:
    listed = httpx.get(f"{server.url}/admin/models", headers=ADMIN_AUTH)
    assert listed.status_code == 200
    return {row["model"]: row for row in listed.json()["models"]}


def add(server: Server, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/models", json=body, headers=ADMIN_AUTH, timeout=60)


def embed(server: Server, model: str, text: str = "x") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/embeddings", json={"model": model, "input": text}, headers=AUTH, timeout=60)


def test_the_listing_says_where_each_registration_came_from(server: Server) -> None:
    assert models(server)["test/fake-dense"]["source"] == "-m"
    added = add(server, model="test/fake-e5")  # in the bundle, not served: -m chose fake-dense only
    assert added.status_code == 201, added.text
    assert added.json()["state"] == "available" and added.json()["family"] == "fake"
    row = models(server)["test/fake-e5"]
    assert (row["source"], row["stored"]) == ("runtime", True)
    assert embed(server, "test/fake-e5").status_code == 200  # loads on first use, like any other
    names = [m["name"] for m in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["models"]]
    assert "test/fake-e5" in names


def test_the_admin_token_guards_it(server: Server) -> None:
    body = {"model": "test/fake-oom"}
    assert httpx.post(f"{server.url}/admin/models", json=body).status_code == 401
    assert httpx.post(f"{server.url}/admin/models", json=body, headers=AUTH).status_code == 403  # not the API key
    assert httpx.get(f"{server.url}/admin/models", headers=AUTH).status_code == 403
    assert httpx.delete(f"{server.url}/admin/models/test/fake-dense").status_code == 401
    assert "test/fake-oom" not in models(server)


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"model": "test/fake-dense"}, 409, "MODEL_EXISTS"),
    ({"model": "test/fake-oom", "served_model_name": "test/fake-dense"}, 409, "MODEL_EXISTS"),
    ({"model": "no-such-org/no-such-model"}, 404, "MODEL_NOT_FOUND"),
    ({"model": "test/fake-oom", "loadtime": {"no_such_option": 1}}, 400, "INVALID_INPUT"),
    ({"model": "test/fake-oom", "adapter": "no-such-family"}, 400, "INVALID_INPUT"),
    ({"model": 3}, 400, "INVALID_INPUT"),
    ({"modle": "test/fake-oom"}, 400, "INVALID_INPUT"),
    ({"model": " "}, 400, "INVALID_INPUT"),
])
def test_bad_additions_get_a_coded_4xx(server: Server, body: dict[str, Any], status: int, code: str) -> None:
    answer = add(server, **body)
    assert answer.status_code == status, answer.text
    assert answer.json()["detail"]["code"] == code and answer.json()["detail"]["message"]
    broken = httpx.post(f"{server.url}/admin/models", content=b"{not json", headers=ADMIN_AUTH)
    assert broken.status_code == 400 and broken.json()["detail"]["code"] == "INVALID_INPUT"


def test_removal_drains_admitted_requests_then_answers_404(server: Server) -> None:
    added = add(server, model="test/fake-dense", served_model_name="slow", loadtime={"batch_delay_s": 0.6}, load=True)
    assert added.status_code == 201 and added.json()["state"] == "loaded"
    answers: list[httpx.Response] = []
    senders = [threading.Thread(target=lambda i=i: answers.append(embed(server, "slow", f"t{i}"))) for i in range(3)]
    for sender in senders:
        sender.start()
    metric = re.compile(r'sie_request_duration_seconds_count\{.*model="slow".*phase="queue".*\} ([0-9.]+)')

    def dispatched() -> bool:  # a batch of them has reached the worker
        found = metric.search(httpx.get(f"{server.url}/metrics").text)
        return found is not None and float(found.group(1)) >= 1

    wait_until(dispatched)
    removed = httpx.delete(f"{server.url}/admin/models/slow", headers=ADMIN_AUTH, timeout=60)
    assert removed.status_code == 200 and removed.json() == {"model": "slow", "removed": True, "drained": True,
                                                             "source": "runtime"}
    for sender in senders:
        sender.join(60)
    assert [a.status_code for a in answers] == [200, 200, 200]  # admitted before the removal: answered
    after = httpx.post(f"{server.url}/v1/encode/slow", json={"items": [{"text": "x"}]}, headers=AUTH)
    assert after.status_code == 404 and after.json()["detail"]["code"] == "MODEL_NOT_FOUND"
    assert embed(server, "slow").json()["error"]["code"] == "model_not_found"
    assert "slow" not in models(server)
    workers = httpx.get(f"{server.url}/admin/workers", headers=ADMIN_AUTH).json()["workers"]
    assert "slow" not in [w["model"] for w in workers]
    gone = httpx.delete(f"{server.url}/admin/models/slow", headers=ADMIN_AUTH)
    assert gone.status_code == 404 and gone.json()["detail"]["code"] == "MODEL_NOT_FOUND"


def test_sie_admin_adds_and_removes(server: Server) -> None:
    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        return admin.main(["--url", server.url, "--token", ADMIN, *argv], out, err), out.getvalue(), err.getvalue()

    code, out, _ = run("models", "add", "test/fake-oom", "--served-model-name", "oom-by-cli", "--load")
    assert code == 0 and out.strip() == "added oom-by-cli (fake, loaded)"
    code, out, _ = run("models", "rm", "oom-by-cli")
    assert code == 0 and out.strip() == "removed oom-by-cli"
    code, _, err = run("models", "rm", "oom-by-cli")
    assert code == 1 and "404 MODEL_NOT_FOUND" in err


def test_the_store_is_written_atomically_and_reloaded_at_start(server: Server, folder: Path) -> None:
    assert add(server, model="test/fake-e5", served_model_name="kept", load=True).status_code == 201
    store = folder / "store" / "models.json"
    kept = {entry["served_model_name"] if "served_model_name" in entry else entry["model"]: entry
            for entry in json.loads(store.read_text())["models"]}
    assert set(kept) == {"test/fake-e5", "kept"}  # what was removed is gone from the file too
    assert kept["kept"] == {"model": "test/fake-e5", "served_model_name": "kept", "load": True}
    assert [p.name for p in store.parent.iterdir()] == ["models.json"]  # no temporary file left behind
    again = Server(flags(folder, store))
    try:
        again.wait_ready()
        rows = models(again)
        assert rows["kept"]["source"] == rows["test/fake-e5"]["source"] == "runtime"
        assert rows["kept"]["state"] == "loaded"  # it asked to be loaded, and was, at start
        assert embed(again, "kept").status_code == 200
    finally:
        again.stop()


def test_a_pool_keeps_its_registrations_to_itself(server: Server, folder: Path) -> None:
    """Pool `b`'s map places test/fake-slow-load in this pool: `b` refuses to add it, and what this pool adds is
    neither listed by `b` nor forwarded by it."""
    pool_map = folder / "pools.json"
    pool_map.write_text(json.dumps({"test/fake-slow-load": server.url}))
    other = Server(flags(folder / "b", folder / "b" / "models.json"),
                   env={"SIE_POOL": "b", "SIE_POOL_MAP": str(pool_map)})
    try:
        other.wait_ready()
        refused = add(other, model="test/fake-slow-load")
        assert refused.status_code == 409 and server.url in refused.json()["detail"]["message"]
        assert add(server, model="test/fake-broken", served_model_name="only-here").status_code == 201
        assert "only-here" not in models(other)
        missing = httpx.post(f"{other.url}/v1/encode/only-here", json={"items": [{"text": "x"}]}, headers=AUTH)
        assert missing.status_code == 404 and "x-sie-forwarded-by" not in missing.headers
    finally:
        other.stop()


def wait_until(condition: Any, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)

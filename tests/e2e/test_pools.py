"""Pools: two real servers on loopback stand in for two pools of the Helm chart, with the chart's pool map. A request
sent to either pool for the other's model is forwarded in one hop, through every API, and answered as the other does."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np
import pytest

from sie_sdk import RequestError, SIEClient
from sie_sdk.types import Item
from sie_worker.adapters.fake import fake_vector
from tests.server import Server, free_port, make_bundle

KEY = "pool-test-key"  # both pools share the API key, as the chart gives them one Secret
DENSE, E5 = "test/fake-dense", "test/fake-e5"  # pool A serves DENSE, pool B serves E5
STRAY = "test/fake-a"  # in the map under B's URL, served by neither: B must not forward it back to itself
DOWN = "test/fake-b"  # in the map under a URL where nothing listens: a pool scaled to zero
DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "Cats purr."]


class Pools(NamedTuple):
    a: Server
    b: Server


def _ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return list(ports)


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    folder = tmp_path_factory.mktemp("pools")
    bundle = make_bundle(folder / "bundle", "fake.yaml")
    started: list[Server] = []
    try:
        for attempt in range(3):  # the ports are free when chosen but not held: another process may take one first
            started = _start_pools(folder, bundle)
            try:
                for server in started:
                    server.wait_ready()
                break
            except RuntimeError as error:
                for server in started:
                    server.stop()
                if attempt == 2 or "address already in use" not in str(error):
                    raise
        yield Pools(*started)
    finally:
        for server in started:
            server.stop()


def _start_pools(folder: Path, bundle: Path) -> list[Server]:
    port_a, port_b, port_down = _ports(3)
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    # The format the chart's ConfigMap renders (templates/configmap-pools.yaml): model -> pool Service URL.
    pool_map = {DENSE: url_a, E5: url_b, STRAY: url_b, DOWN: f"http://127.0.0.1:{port_down}"}
    (folder / "pools.json").write_text(json.dumps(pool_map))
    started = []
    for name, port, model in (("a", port_a, DENSE), ("b", port_b, E5)):
        env = {"SIE_POOL": name, "SIE_POOL_MAP": str(folder / "pools.json"), "SIE_API_KEY": KEY}
        started.append(Server(["--bundle", str(bundle), "-m", model], env=env, log=folder / f"{name}.log",
                              port=port))
    return started


def post(server: Server, path: str, *, json: Any = None, content: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(server.url + path, json=json, content=content, timeout=60,
                      headers={"authorization": f"Bearer {KEY}", **(headers or {})})


def test_native_encode_reaches_the_other_pool(pools: Pools) -> None:
    with SIEClient(pools.a.url, api_key=KEY) as via_a, SIEClient(pools.b.url, api_key=KEY) as direct:
        forwarded = via_a.encode(E5, [Item(text="cats"), Item(text="dogs", id="d")])
        reference = direct.encode(E5, [Item(text="cats"), Item(text="dogs", id="d")])
        query = via_a.encode(E5, Item(text="cats"), is_query=True)["dense"]
    for got, want in zip(forwarded, reference, strict=True):
        np.testing.assert_array_equal(got["dense"], want["dense"])
        assert got.get("id") == want.get("id")
    np.testing.assert_allclose(forwarded[0]["dense"], fake_vector("passage: cats", 16), atol=1e-6)
    np.testing.assert_allclose(query, fake_vector("query: cats", 16), atol=1e-6)
    # JSON in, JSON out, the query string kept; our version headers once, not once per hop.
    response = post(pools.a, f"/v1/encode/{E5}?unused=1", json={"items": [{"text": "cats"}]},
                    headers={"accept": "application/json"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get_list("x-sie-server-version") == ["0.10.1"]
    values = response.json()["items"][0]["dense"]["values"]
    np.testing.assert_allclose(values, fake_vector("passage: cats", 16), atol=1e-6)
    info = httpx.get(f"{pools.a.url}/v1/models/{E5}", headers={"authorization": f"Bearer {KEY}"})
    assert info.status_code == 200 and E5 in info.text  # the model's page, from the pool that serves it


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embeddings"])
def test_body_routes_reach_the_other_pool(pools: Pools, path: str) -> None:
    body = {"model": E5, "input": ["cats", "dogs"]}
    forwarded, direct = post(pools.a, path, json=body), post(pools.b, path, json=body)
    assert forwarded.status_code == direct.status_code == 200, forwarded.text
    got = [d["embedding"] for d in forwarded.json()["data"]]
    assert got == [d["embedding"] for d in direct.json()["data"]]
    np.testing.assert_allclose(got[1], fake_vector("passage: dogs", 16), atol=1e-6)
    assert forwarded.json()["model"] == E5


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_rerank_reaches_the_other_pool(pools: Pools, path: str) -> None:
    # The other direction: B forwards to A, whose fake model scores (E5's config lists no score task).
    body = {"model": DENSE, "query": "capital of France", "documents": DOCS, "return_documents": True}
    forwarded, direct = post(pools.b, path, json=body).json(), post(pools.a, path, json=body).json()
    assert forwarded["results"] == direct["results"] and len(forwarded["results"]) == 3
    with SIEClient(pools.b.url, api_key=KEY) as via_b:
        native = via_b.score(DENSE, Item(text="capital of France"), [Item(text=d) for d in DOCS])
    by_index = {int(s["item_id"].split("-")[1]): s["score"] for s in native["scores"]}
    if path == "/v1/rerank":
        for result in forwarded["results"]:
            assert result["relevance_score"] == pytest.approx(by_index[result["index"]], abs=1e-6)


def test_tei_per_model_routes_reach_the_other_pool(pools: Pools) -> None:
    # `/tei/{model}/...` names its model in the path, with TEI's route after it: forwarded like every model route.
    body = {"inputs": ["cats", "dogs"]}
    forwarded, direct = post(pools.a, f"/tei/{E5}/embed", json=body), post(pools.b, f"/tei/{E5}/embed", json=body)
    assert forwarded.status_code == direct.status_code == 200, forwarded.text
    assert forwarded.json() == direct.json() and len(forwarded.json()) == 2
    root = post(pools.a, f"/tei/{E5}/", json=body)  # the model's own root route, by its type
    assert root.status_code == 200 and root.json() == direct.json()
    info = httpx.get(f"{pools.a.url}/tei/{E5}/info", headers={"authorization": f"Bearer {KEY}"})
    assert info.status_code == 200 and info.json()["served_model_name"] == E5
    assert httpx.get(f"{pools.a.url}/tei/{E5}/health").status_code == 200  # a probe: open, in both pools
    down = post(pools.a, f"/tei/{DOWN}/embed", json=body)
    assert down.status_code == 503 and down.json()["error_type"] == "Unhealthy"
    unknown = post(pools.a, "/tei/no/such-model/embed", json=body)
    assert unknown.status_code == 404 and unknown.json()["error_type"] == "NotFound"


def test_body_is_replayed_to_a_local_handler(pools: Pools) -> None:
    # The forwarding middleware reads the body for its model; the local handler still gets all of it.
    texts = [f"word {i} " * 200 for i in range(64)]  # about 100 kB: several receive() messages
    response = post(pools.a, "/v1/embeddings", json={"model": DENSE, "input": texts})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["data"][63]["embedding"], fake_vector(texts[63], 16), atol=1e-6)
    malformed = post(pools.a, "/v1/embeddings", content=b'{"model": "test/fake-e5", "input": [', 
                     headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_request"


def test_a_model_in_neither_pool_is_404(pools: Pools) -> None:
    response = post(pools.a, "/v1/embeddings", json={"model": "no/such-model", "input": ["x"]})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    with SIEClient(pools.a.url, api_key=KEY) as client, pytest.raises(RequestError) as caught:
        client.encode("no/such-model", Item(text="x"))
    assert caught.value.status_code == 404 and caught.value.code == "MODEL_NOT_FOUND"


def test_a_forwarded_request_is_never_forwarded_again(pools: Pools) -> None:
    # Marked as forwarded already: A answers it itself, and it does not serve E5.
    marked = post(pools.a, "/v1/embeddings", json={"model": E5, "input": ["x"]}, headers={"x-sie-forwarded-by": "b"})
    assert marked.status_code == 404 and marked.json()["error"]["code"] == "model_not_found"
    native = post(pools.a, f"/v1/encode/{E5}", json={"items": [{"text": "x"}]},
                  headers={"x-sie-forwarded-by": "b", "accept": "application/json"})
    assert native.status_code == 404 and native.json()["detail"]["code"] == "MODEL_NOT_FOUND"
    # A wrong map: STRAY points at B, which does not serve it either. A forwards once; B, seeing the mark, answers
    # 404 instead of forwarding to itself, and A relays that answer.
    # (Infinity's routes are left out: a server with one model answers them whatever model they name.)
    stray = post(pools.a, "/v1/embeddings", json={"model": STRAY, "input": ["x"]})
    assert stray.status_code == 404 and stray.json()["error"]["code"] == "model_not_found", stray.text
    stray = post(pools.a, f"/v1/encode/{STRAY}", json={"items": [{"text": "x"}]},
                 headers={"accept": "application/json"})
    assert stray.status_code == 404 and stray.json()["detail"]["code"] == "MODEL_NOT_FOUND", stray.text
    assert "'test/fake-e5'" in stray.json()["detail"]["message"]  # B's "did you mean": B answered, not A


def test_unreachable_pool_is_a_retryable_503(pools: Pools) -> None:
    openai = post(pools.a, "/v1/embeddings", json={"model": DOWN, "input": ["x"]})
    assert openai.status_code == 503 and openai.json()["error"]["code"] == "pool_unavailable"
    assert openai.headers["retry-after"] == "5" and "x-should-retry" not in openai.headers
    native = post(pools.a, f"/v1/encode/{DOWN}", json={"items": [{"text": "x"}]},
                  headers={"accept": "application/json"})
    assert native.status_code == 503 and native.json()["detail"]["code"] == "MODEL_LOADING"  # sie-sdk retries it
    infinity = post(pools.a, "/embeddings", json={"model": DOWN, "input": ["x"]})
    assert infinity.status_code == 503 and infinity.json()["error"]["code"] == 503
    # Counted as forwarded with its model, so that KEDA's wake trigger sees demand for a pool with no pods.
    assert _sample(pools.a, "sie_forwarded_requests_total", model=DOWN, endpoint="openai_embeddings",
                   status="503") >= 1


def test_auth_is_checked_before_forwarding_and_the_key_travels(pools: Pools) -> None:
    refused = httpx.post(f"{pools.a.url}/v1/embeddings", json={"model": E5, "input": ["x"]})
    assert refused.status_code == 401
    assert post(pools.a, "/v1/embeddings", json={"model": E5, "input": ["x"]}).status_code == 200


def test_a_forwarded_request_is_counted_as_answered_once_by_the_pool_that_answers(pools: Pools) -> None:
    def answered(server: Server) -> float:
        return _sample(server, "sie_requests_total", model=E5, endpoint="openai_embeddings", status="200")

    def forwarded(server: Server) -> float:
        return _sample(server, "sie_forwarded_requests_total", model=E5, endpoint="openai_embeddings", status="200")

    before = answered(pools.a), forwarded(pools.a), answered(pools.b)
    with ThreadPoolExecutor(8) as executor:
        answers = list(executor.map(lambda i: post(pools.a, "/v1/embeddings", json={"model": E5, "input": [f"t{i}"]}),
                                    range(16)))
    assert [r.status_code for r in answers] == [200] * 16
    got = [r.json()["data"][0]["embedding"] for r in answers]
    for i, vector in enumerate(got):
        np.testing.assert_allclose(vector, fake_vector(f"passage: t{i}", 16), atol=1e-6)
    assert (answered(pools.a), forwarded(pools.a), answered(pools.b)) == (before[0], before[1] + 16, before[2] + 16)
    assert _sample(pools.a, "http_requests_total", handler="/v1/embeddings", method="POST", status="2xx") >= 16


def _sample(server: Server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_the_map_is_read_in_the_format_the_chart_renders(tmp_path: Path) -> None:
    from sie_router.middleware.forward import load_pool_map
    from tests.deploy.test_chart import CASES, one, render

    rendered = one(render(CASES["two-pools"], name="prod", namespace="ml"), "ConfigMap", "prod-sie-pools")
    (tmp_path / "pools.json").write_text(rendered["data"]["pools.json"])
    assert load_pool_map(tmp_path / "pools.json")["BAAI/bge-m3"] == "http://prod-sie-gpu.ml.svc:8080"
    (tmp_path / "bad.json").write_text('{"pools": {"gpu": {"url": "http://x"}}}')
    with pytest.raises(ValueError, match="model -> pool Service URL"):
        load_pool_map(tmp_path / "bad.json")

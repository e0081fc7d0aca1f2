"""Rerank routes against the fake scorer: Cohere `/v1/rerank`, Infinity `/rerank`, and native `/v1/score` agree."""

from __future__ import annotations

import math

import httpx
import pytest

from sie_sdk import SIEClient
from sie_sdk.types import Item
from tests.server import MINILM, Server

DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "Berlin is in Germany.", "Cats purr."]
MODEL = "test/fake-dense"


def test_v1_rerank_sorts_cuts_and_matches_native_scores(server: Server) -> None:
    body = httpx.post(f"{server.url}/v1/rerank", json={"model": MODEL, "query": "capital of France",
                                                       "documents": DOCS, "top_n": 3,
                                                       "return_documents": True}).json()
    assert list(body) == ["object", "results", "model", "usage", "id", "created"]
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert all(r["document"] == {"text": DOCS[r["index"]]} for r in body["results"])
    with SIEClient(server.url) as client:
        native = client.score(MODEL, Item(text="capital of France"), [Item(text=d) for d in DOCS])
    by_id = {s["item_id"]: s["score"] for s in native["scores"]}
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(by_id[f"item-{result['index']}"], abs=1e-6)
    assert [s["rank"] for s in native["scores"]] == [0, 1, 2, 3]


def test_infinity_rerank_shape_documents_as_strings_and_top_n(server: Server) -> None:
    plain = httpx.post(f"{server.url}/rerank", json={"model": MODEL, "query": "q", "documents": DOCS}).json()
    assert [r["document"] for r in plain["results"]] == [None] * 4
    assert plain["usage"]["prompt_tokens"] == sum(len("q" + d) for d in DOCS)
    assert plain["id"].startswith("infinity-")
    with_docs = httpx.post(f"{server.url}/rerank", json={"model": MODEL, "query": "q", "documents": DOCS,
                                                         "return_documents": True, "top_n": 10}).json()
    assert sorted(r["document"] for r in with_docs["results"]) == sorted(DOCS)
    raw = httpx.post(f"{server.url}/rerank", json={"model": MODEL, "query": "q", "documents": DOCS,
                                                   "raw_scores": True}).json()
    sigmoid = {r["index"]: r["relevance_score"] for r in plain["results"]}
    for r in raw["results"]:  # raw scores are the logits behind the sigmoid scores
        assert 1 / (1 + math.exp(-r["relevance_score"])) == pytest.approx(sigmoid[r["index"]], abs=1e-6)


@pytest.mark.parametrize(("path", "payload", "status"), [
    ("/v1/rerank", {"model": MODEL, "query": "", "documents": DOCS}, 400),
    ("/v1/rerank", {"model": MODEL, "query": "q", "documents": []}, 400),
    ("/v1/rerank", {"model": MODEL, "query": "q", "documents": ["d"] * 1001}, 400),
    ("/v1/rerank", {"model": MODEL, "query": "q", "documents": DOCS, "top_n": 0}, 400),
    ("/v1/rerank", {"model": MINILM, "query": "q", "documents": DOCS}, 400),
    ("/rerank", {"model": MODEL, "query": "q", "documents": []}, 422),
])
def test_bad_rerank_input_is_a_coded_4xx(server: Server, path: str, payload: dict, status: int) -> None:
    response = httpx.post(server.url + path, json=payload)
    assert response.status_code == status, response.text
    assert httpx.post(f"{server.url}/v1/rerank", json={"model": MODEL, "query": "q", "documents": DOCS}).status_code \
        == 200


def test_native_score_limits(server: Server) -> None:
    url = f"{server.url}/v1/score/{MODEL}"
    assert httpx.post(url, json={"query": {"text": "q"}, "items": []}).status_code == 400
    too_many = httpx.post(url, json={"query": {"text": "q"}, "items": [{"text": "d"}] * 1001})
    assert too_many.status_code == 400 and too_many.json()["detail"]["code"] == "INVALID_INPUT"
    no_task = httpx.post(f"{server.url}/v1/score/{MINILM}", json={"query": {"text": "q"}, "items": [{"text": "d"}]})
    assert no_task.status_code == 400

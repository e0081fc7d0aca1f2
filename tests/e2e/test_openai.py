"""The official openai SDK against /v1/embeddings, and an Infinity-style client against /embeddings."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest

from tests import precision
from tests.sentences import SENTENCES
from tests.server import MINILM, Server


@pytest.fixture(scope="module")
def reference(reference_model) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(reference_model.encode(SENTENCES, normalize_embeddings=True))


@pytest.mark.numeric
@pytest.mark.parametrize("base", ["/v1", ""])
@pytest.mark.parametrize("encoding_format", [openai.NOT_GIVEN, "float"])
def test_openai_sdk_matches_sentence_transformers(server: Server, reference: np.ndarray, base: str,
                                                  encoding_format: object) -> None:
    client = openai.OpenAI(base_url=server.url + base, api_key="EMPTY", max_retries=0)
    response = client.embeddings.create(model=MINILM, input=SENTENCES, encoding_format=encoding_format)  # type: ignore[arg-type]
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert got.shape == (64, 384)
    assert [d.index for d in response.data] == list(range(64))
    precision.assert_vectors_close(got, reference)


@pytest.mark.numeric
def test_explicit_base64_is_little_endian_float32(server: Server, reference: np.ndarray) -> None:
    body = httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": SENTENCES[:2],
                                                            "encoding_format": "base64"}).json()
    vectors = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    precision.assert_vectors_close(vectors, reference[:2])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 4


def test_json_floats_are_float32s_shortest_form(server: Server) -> None:
    """Each float reads back to exactly the float32 that base64 carries, written in at most 9 significant digits
    (float32's shortest round-trip form, as TEI writes it), not the 17 of its float64 widening."""
    def post(encoding_format: str) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": SENTENCES[:3],
                                                                "encoding_format": encoding_format})

    raw = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                    for d in post("base64").json()["data"]])
    literals = [d["embedding"] for d in json.loads(post("float").content, parse_float=str)["data"]]
    assert np.array_equal(np.asarray(literals, dtype=np.float32), raw)  # read as a client does: a float, then float32
    digits = [len(text.lower().split("e")[0].replace("-", "").replace(".", "").strip("0")) for row in literals
              for text in row]
    assert max(digits) <= 9 and np.mean(digits) < 9


def test_dimensions_renormalises_on_v1_and_slices_on_root(server: Server) -> None:
    v1 = httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": "hello", "dimensions": 64}).json()
    root = httpx.post(f"{server.url}/embeddings", json={"model": MINILM, "input": "hello", "dimensions": 64}).json()
    full = httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": "hello"}).json()
    a, b, c = (np.array(x["data"][0]["embedding"]) for x in (v1, root, full))
    assert a.shape == b.shape == (64,)
    assert abs(np.linalg.norm(a) - 1) < 1e-5
    np.testing.assert_allclose(b, c[:64], atol=1e-6)
    bad = httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": "hello", "dimensions": 385})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "dimensions"


def test_langchain_token_ids_embed_like_the_text(server: Server) -> None:
    import bpe_openai

    ids = bpe_openai.get_encoding("cl100k_base").encode(SENTENCES[5])
    by_ids = httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": [ids]}).json()
    by_text = httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": [SENTENCES[5]]}).json()
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-6)
    bad = httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": [[10**9]]})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_token_ids"


def test_infinity_shape_and_character_usage(server: Server) -> None:
    response = httpx.post(f"{server.url}/embeddings", json={"model": MINILM, "input": ["hello world", " hi "]})
    body = response.json()
    assert list(body) == ["object", "data", "model", "usage", "id", "created"]
    assert body["usage"] == {"prompt_tokens": 13, "total_tokens": 13}
    assert body["id"].startswith("infinity-")
    assert [d["index"] for d in body["data"]] == [0, 1]
    models = httpx.get(f"{server.url}/models").json()
    entry = next(m for m in models["data"] if m["id"] == MINILM)
    assert list(entry) == ["id", "stats", "object", "owned_by", "created", "backend", "capabilities"]
    assert entry["capabilities"] == ["embed"]


@pytest.mark.parametrize(("path", "payload", "status", "field"), [
    ("/v1/embeddings", {"model": MINILM, "input": []}, 400, "input"),
    ("/v1/embeddings", {"model": MINILM, "input": 123}, 400, "input"),
    ("/v1/embeddings", {"model": MINILM, "input": "x", "encoding_format": "binary"}, 400, "encoding_format"),
    ("/v1/embeddings", {"model": "no/such-model", "input": "x"}, 404, "model"),
    ("/embeddings", {"model": MINILM, "input": []}, 422, None),
    ("/embeddings", {"model": MINILM, "input": "x", "encoding_format": "binary"}, 422, None),
])
def test_bad_input_gets_a_clear_4xx_and_the_worker_keeps_serving(server: Server, path: str, payload: dict,
                                                                 status: int, field: str | None) -> None:
    response = httpx.post(server.url + path, json=payload)
    assert response.status_code == status, response.text
    body = response.json()
    if path.startswith("/v1"):
        assert body["error"]["message"] and body["error"]["param"] == field
    else:
        assert isinstance(body["detail"], list) and body["detail"][0]["msg"]
    ok = httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": "still fine"})
    assert ok.status_code == 200


def test_malformed_json_is_400(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/embeddings", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"

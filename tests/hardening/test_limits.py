"""Request limits, each refused with its own code before any work is done, and encode's `truncate` option."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest

from sie_router.settings import Settings
from tests.server import MINILM, Server

FAKE = "test/fake-dense"
JSON = {"accept": "application/json"}
LONG_TEXT = " ".join(f"word{i}" for i in range(400))  # well over MiniLM's 256 tokens


def post(server: Server, path: str, headers: dict[str, str] | None = None, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=60, headers={**JSON, **(headers or {})},
                      **kwargs)  # type: ignore[arg-type]


def native_code(response: httpx.Response) -> str:
    return str(response.json()["detail"]["code"])


def test_body_over_the_limit_is_413_in_every_envelope(server: Server) -> None:
    limit = Settings().max_request_bytes
    body = b'{"items": [{"text": "' + b"a" * limit + b'"}]}'
    native = post(server, f"/v1/encode/{FAKE}", content=body)
    assert native.status_code == 413 and native_code(native) == "INPUT_TOO_LONG"
    compat = post(server, "/v1/embeddings", content=body)
    assert compat.status_code == 413 and compat.json()["error"]["code"] == "request_too_large"
    infinity = post(server, "/embeddings", content=body)
    assert infinity.status_code == 413 and infinity.json()["error"]["code"] == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the bound applies while reading
        for _ in range(limit // 2**20 + 2):
            yield b"a" * 2**20

    streamed = post(server, f"/v1/encode/{FAKE}", content=chunks())
    assert streamed.status_code == 413 and native_code(streamed) == "INPUT_TOO_LONG"


def test_too_many_items_is_400(server: Server) -> None:
    many = Settings().max_items_per_request + 1
    native = post(server, f"/v1/encode/{FAKE}", json={"items": [{"text": str(i)} for i in range(many)]})
    assert native.status_code == 400 and native_code(native) == "INVALID_INPUT"
    assert str(Settings().max_items_per_request) in native.json()["detail"]["message"]
    compat = post(server, "/v1/embeddings", json={"model": FAKE, "input": [str(i) for i in range(many)]})
    assert compat.status_code == 400 and compat.json()["error"]["param"] == "input"
    score = post(server, f"/v1/score/{FAKE}", json={"query": {"text": "q"}, "items": [{"text": "d"}] * 1001})
    assert score.status_code == 400 and native_code(score) == "INVALID_INPUT"
    labels = post(server, f"/v1/extract/{FAKE}", json={"items": [{"text": "x"}],
                                                      "params": {"labels": [str(i) for i in range(1001)]}})
    assert labels.status_code == 400 and labels.json()["detail"]["param"] == "params.labels"
    rerank = post(server, "/v1/rerank", json={"model": FAKE, "query": "q", "documents": ["d"] * 1001})
    assert rerank.status_code == 400 and rerank.json()["error"]["param"] == "documents"


def test_text_over_the_item_limit_is_400_before_tokenising(server: Server) -> None:
    text = "é" * (Settings().max_item_bytes // 2 + 1)  # few characters, but over the limit in UTF-8 bytes
    response = post(server, f"/v1/encode/{MINILM}", json={"items": [{"text": "ok"}, {"text": text}]})
    assert response.status_code == 400 and native_code(response) == "INVALID_INPUT"
    assert response.json()["detail"]["param"] == "items[1].text"


def test_image_over_the_limit_is_400(server: Server) -> None:
    image = b"\x89PNG" + b"\x00" * Settings().max_image_bytes
    body = msgspec.msgpack.encode({"items": [{"images": [{"data": image, "format": "png"}]}]})
    response = post(server, f"/v1/encode/{FAKE}", content=body, headers={"content-type": "application/msgpack"})
    assert response.status_code == 400 and response.json()["detail"]["param"] == "items[0].images[0]"
    assert "byte limit" in response.json()["detail"]["message"]


def test_out_of_vocabulary_token_ids_are_400(server: Server) -> None:
    response = post(server, "/v1/embeddings", json={"model": FAKE, "input": [[1, 2, 10**9]]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_token_ids"


def encode(server: Server, text: str, options: dict[str, object] | None = None) -> httpx.Response:
    params = {"options": options} if options is not None else {}
    return post(server, f"/v1/encode/{MINILM}", json={"items": [{"text": text}], "params": params})


def test_truncate_false_states_the_token_count(server: Server, minilm_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokens = len(tokenizer.encode(LONG_TEXT).ids)  # with [CLS] and [SEP]
    response = encode(server, LONG_TEXT, {"truncate": False})
    assert response.status_code == 400 and native_code(response) == "INPUT_TOO_LONG"
    message = response.json()["detail"]["message"]
    assert f"{tokens} tokens" in message and "256" in message
    assert encode(server, "a short text", {"truncate": False}).status_code == 200


def test_encode_truncates_silently_by_default(server: Server) -> None:
    default, explicit = encode(server, LONG_TEXT), encode(server, LONG_TEXT, {"truncate": True})
    assert default.status_code == explicit.status_code == 200
    vectors = [np.array(r.json()["items"][0]["dense"]["values"]) for r in (default, explicit)]
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)
    assert abs(float(np.linalg.norm(vectors[0])) - 1.0) < 1e-4


@pytest.mark.parametrize("options", [{"truncate": "no"}, {"output_types": 7}, {"profile": [1]}, {"instruction": 5},
                                     {"pooling": "weird"}, {"is_query": "yes"}])
def test_options_of_the_wrong_type_or_value_are_400(server: Server, options: dict[str, object]) -> None:
    response = encode(server, "hi", options)
    assert response.status_code == 400 and native_code(response) == "INVALID_INPUT", response.text


def test_deeply_nested_or_non_utf8_bodies_are_400(server: Server) -> None:
    deep = b'{"items": [{"text": "x"}], "params": {"options": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}}"
    assert post(server, f"/v1/encode/{FAKE}", content=deep).status_code == 400
    assert post(server, "/v1/embeddings", content=b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}").status_code == 400
    bad_utf8 = b'{"items": [{"text": "\xed\xa0\x80"}]}'
    assert post(server, f"/v1/encode/{FAKE}", content=bad_utf8).status_code == 400
    msgpack = b"\x81\xa5items\x91\x81\xa4text\xa3\xed\xa0\x80"
    response = post(server, f"/v1/encode/{FAKE}", content=msgpack, headers={"content-type": "application/msgpack"})
    assert response.status_code == 400 and native_code(response) == "INVALID_INPUT"

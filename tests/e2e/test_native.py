"""Native `/v1/encode` through our own sie_sdk, and raw msgpack/JSON bodies."""

from __future__ import annotations

import importlib.util

import httpx
import msgspec
import numpy as np
import pytest

from sie_sdk import RequestError, SIEClient
from sie_sdk.types import Item
from sie_sdk.wire import decode_msgpack
from sie_worker.adapters.fake import fake_vector
from tests import precision
from tests.sentences import SENTENCES
from tests.server import MINILM, Server


@pytest.mark.numeric
def test_sdk_encodes_one_item_and_a_list(server: Server, reference_model) -> None:  # type: ignore[no-untyped-def]
    with SIEClient(server.url) as client:
        one = client.encode(MINILM, Item(text=SENTENCES[0]))
        many = client.encode(MINILM, [Item(text=s, id=f"s{i}") for i, s in enumerate(SENTENCES[:8])])
    want = reference_model.encode(SENTENCES[:8], normalize_embeddings=True)
    assert one["dense"].dtype == np.float32 and one["dense"].shape == (384,)
    precision.assert_vectors_close(one["dense"], want[0])
    assert [r["id"] for r in many] == [f"s{i}" for i in range(8)]
    precision.assert_vectors_close([r["dense"] for r in many], want)


def test_unknown_model_is_404_model_not_found(server: Server) -> None:
    with SIEClient(server.url) as client, pytest.raises(RequestError) as caught:
        client.encode("no/such-model", Item(text="x"))
    assert caught.value.status_code == 404 and caught.value.code == "MODEL_NOT_FOUND"


def test_json_in_json_out(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/encode/{MINILM}", json={"items": [{"text": "hi"}]},
                          headers={"accept": "application/json"})
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-sie-server-version"] == "0.10.1"
    values = response.json()["items"][0]["dense"]["values"]
    assert isinstance(values, list) and len(values) == 384


@pytest.mark.parametrize(("dtype", "wire", "width"), [("float16", "<f2", 16), ("int8", "|i1", 16),
                                                      ("uint8", "|u1", 16), ("binary", "|u1", 2)])
def test_output_dtypes(server: Server, dtype: str, wire: str, width: int) -> None:
    body = msgspec.msgpack.encode({"items": [{"text": "quantise me"}], "params": {"output_dtype": dtype}})
    response = httpx.post(f"{server.url}/v1/encode/test/fake-dense", content=body,
                          headers={"content-type": "application/msgpack"})
    dense = msgspec.msgpack.decode(response.content)["items"][0]["dense"]
    assert dense["values"][b"type"] == wire and dense["dims"] == 16
    values = decode_msgpack(response.content)["items"][0]["dense"]["values"]
    assert values.shape == (width,)
    expected = fake_vector("quantise me", 16)
    if dtype == "binary":
        np.testing.assert_array_equal(values, np.packbits(expected > 0))
    if dtype == "int8":
        np.testing.assert_array_equal(values, np.round(expected / np.abs(expected).max() * 127).astype(np.int8))


def test_query_template_from_model_config(server: Server) -> None:
    with SIEClient(server.url) as client:
        query = client.encode("test/fake-e5", Item(text="cats"), is_query=True)["dense"]
        doc = client.encode("test/fake-e5", Item(text="cats"))["dense"]
    np.testing.assert_allclose(query, fake_vector("query: cats", 16), atol=1e-6)
    np.testing.assert_allclose(doc, fake_vector("passage: cats", 16), atol=1e-6)


@pytest.mark.parametrize(("body", "content_type"), [
    (msgspec.msgpack.encode({"items": []}), "application/msgpack"),
    (msgspec.msgpack.encode({"items": [{"text": 123}]}), "application/msgpack"),
    (b"\xc1\xff\x00garbage", "application/msgpack"),
    (b"{bad json", "application/json"),
    (msgspec.msgpack.encode({"items": [{"id": "x"}]}), "application/msgpack"),
    (msgspec.msgpack.encode({"items": [{"text": "x"}], "params": {"output_types": ["sparse"]}}), "application/msgpack"),
    (msgspec.msgpack.encode({"items": [{"text": "x"}], "params": {"output_dtype": "int4"}}), "application/msgpack"),
    (msgspec.msgpack.encode({"items": [{"text": "x"}], "params": {"options": {"profile": "nope"}}}),
     "application/msgpack"),
])
def test_bad_native_input_is_400_invalid_input(server: Server, body: bytes, content_type: str) -> None:
    response = httpx.post(f"{server.url}/v1/encode/{MINILM}", content=body, headers={"content-type": content_type})
    assert response.status_code == 400, response.text
    assert response.json()["detail"]["code"] == "INVALID_INPUT"
    assert response.headers["x-sie-error-code"] == "INVALID_INPUT"
    assert response.json()["detail"]["message"]
    with SIEClient(server.url) as client:
        assert client.encode(MINILM, Item(text="ok"))["dense"].shape == (384,)


def test_models_listing_serves_sie_and_openai_shapes(server: Server) -> None:
    body = httpx.get(f"{server.url}/v1/models").json()
    names = [m["name"] for m in body["models"]]
    assert MINILM in names and [d["id"] for d in body["data"]] == names
    one = httpx.get(f"{server.url}/v1/models/{MINILM}").json()
    assert one["state"] == "loaded" and one["dims"] == {"dense": 384}
    assert one["engine"] == ("openvino" if importlib.util.find_spec("openvino") else "onnx")  # auto, on the CPU
    assert one["precision"] == precision.mode(), "what the worker computes in: bf16 under auto on a bf16 CPU"
    assert httpx.get(f"{server.url}/v1/models/test/fake-dense").json()["engine"] == "fake"
    missing = httpx.get(f"{server.url}/v1/models/nope/nope")
    assert missing.status_code == 404 and missing.json()["detail"]["code"] == "MODEL_NOT_FOUND"


def test_health_probes(server: Server) -> None:
    assert httpx.get(f"{server.url}/healthz").text == "ok"
    assert httpx.get(f"{server.url}/readyz").text == "ok"
    assert "unix" in httpx.get(f"{server.url}/health").json()

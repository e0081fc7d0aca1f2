"""Extraction and CLIP end to end: tiny checkpoints served by a real server equal their references in this process.

References (transformers pipelines, `GLiNER.predict_entities`, `CLIPModel` towers) run on the same checkpoint folders.
"""

from __future__ import annotations

import base64
import warnings
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
import torch
from transformers import pipeline

from sie_sdk import SIEClient
from sie_sdk.types import ImageInput, Item
from tests import precision
from tests.extract_server import (
    CLIP,
    CLIP_DIM,
    CLIP_IMAGES,
    ENTITY_LABELS,
    GLINER,
    LABELS,
    NER,
    NLI,
    NLI_TEMPLATE,
    PRELOADED,
    SENTIMENT,
    TEXTS,
    ExtractServer,
    clip_image,
    clip_reference,
    clip_text,
    declared_png,
    image_bytes,
)
from tests.server import lean_engine

RESULT_KEYS = ["id", "entities", "relations", "classifications", "objects", "data"]
MSGPACK = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
ATOL = precision.TORCH_FLOAT32_ATOL  # not `numeric`: float32 mode only, where lean and torch families agree to this


def post_msgpack(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url, content=msgspec.msgpack.encode(body), headers=MSGPACK, timeout=60)


def extract(srv: ExtractServer, model: str, items: list[dict[str, Any]], labels: list[str] | None = None,
            **options: Any) -> dict[str, Any]:
    """A native extract call on the wire (msgpack both ways); the raw response body."""
    response = post_msgpack(f"{srv.url}/v1/extract/{model}",
                            {"items": items, "params": {"labels": labels, "options": options or None}})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = msgspec.msgpack.decode(response.content)
    assert body["model"] == model and len(body["items"]) == len(items)
    for i, result in enumerate(body["items"]):
        assert list(result) == RESULT_KEYS  # all five result keys, no error
        assert result["id"] == items[i].get("id", f"item-{i}")
        assert (result["relations"], result["objects"], result["data"]) == ([], [], {})
    return body


def texts(*values: str) -> list[dict[str, Any]]:
    return [{"text": t} for t in values]


def assert_classifications(got: list[dict[str, Any]], want: list[tuple[str, float]]) -> None:
    assert [c["label"] for c in got] == [label for label, _ in want]
    assert [c["score"] for c in got] == pytest.approx([score for _, score in want], abs=ATOL)


def pids(srv: ExtractServer) -> dict[str, int]:
    workers = httpx.get(f"{srv.url}/admin/workers").json()["workers"]
    return {w["model"]: w["pid"] for w in workers if w["state"] == "loaded"}


# -- references, computed in this process while the server loads its models ------------------------------------------


@pytest.fixture(scope="module")
def clip_model(extract_server: ExtractServer) -> tuple[Any, Any]:
    return clip_reference(extract_server.folders[CLIP])


@pytest.fixture(scope="module")
def gliner_reference(extract_server: ExtractServer) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from gliner import GLiNER

    return GLiNER.from_pretrained(str(extract_server.folders[GLINER]), local_files_only=True)


# -- classification, zero-shot, NER, GLiNER ---------------------------------------------------------------------------


def test_sentiment_matches_the_text_classification_pipeline(extract_server: ExtractServer) -> None:
    reference = pipeline("text-classification", model=str(extract_server.folders[SENTIMENT]), top_k=None,
                         device="cpu")
    want = [[(d["label"], d["score"]) for d in found] for found in reference(TEXTS)]
    items = [{"text": TEXTS[0], "id": "first"}, *texts(*TEXTS[1:])]
    body = extract(extract_server, SENTIMENT, items)
    for result, expected in zip(body["items"], want, strict=True):
        assert_classifications(result["classifications"], expected)
        assert result["entities"] == []
    assert [r["id"] for r in body["items"]] == ["first", "item-1", "item-2", "item-3"]
    assert body["usage"]["input_tokens"] > len(TEXTS) * 3


@pytest.mark.parametrize("options", [{}, {"multi_label": True}, {"hypothesis_template": "It is about {}."}])
def test_zero_shot_matches_the_zero_shot_pipeline(extract_server: ExtractServer, options: dict[str, Any]) -> None:
    reference = pipeline("zero-shot-classification", model=str(extract_server.folders[NLI]), device="cpu")
    found = reference(TEXTS, candidate_labels=LABELS, **{"hypothesis_template": NLI_TEMPLATE, **options})
    body = extract(extract_server, NLI, texts(*TEXTS), LABELS, **options)
    for result, expected in zip(body["items"], found, strict=True):
        assert_classifications(result["classifications"], list(zip(expected["labels"], expected["scores"],
                                                                    strict=True)))
    total = sum(c["score"] for c in body["items"][0]["classifications"])
    assert (total == pytest.approx(1.0, abs=1e-6)) is not bool(options.get("multi_label"))


def test_ner_matches_the_token_classification_pipeline(extract_server: ExtractServer) -> None:
    reference = pipeline("token-classification", model=str(extract_server.folders[NER]),
                         aggregation_strategy="simple", device="cpu")
    body = extract(extract_server, NER, texts(*TEXTS))
    total = 0
    for text, result, want in zip(TEXTS, body["items"], reference(TEXTS), strict=True):
        got = result["entities"]
        assert [(e["label"], e["start"], e["end"]) for e in got] == [(w["entity_group"], w["start"], w["end"])
                                                                     for w in want]
        assert [e["score"] for e in got] == pytest.approx([float(w["score"]) for w in want], abs=ATOL)
        assert all(e["text"] == text[e["start"]:e["end"]] and e["bbox"] is None for e in got)
        total += len(got)
    assert total >= 3


@pytest.mark.parametrize("options", [{}, {"threshold": 0.3}, {"flat_ner": False, "multi_label": True}])
def test_gliner_matches_predict_entities(extract_server: ExtractServer, gliner_reference: Any,
                                         options: dict[str, Any]) -> None:
    body = extract(extract_server, GLINER, texts(*TEXTS), ENTITY_LABELS, **options)
    total = 0
    for text, result in zip(TEXTS, body["items"], strict=True):
        want = gliner_reference.predict_entities(text, ENTITY_LABELS, **{"threshold": 0.5, **options})
        got = result["entities"]
        assert [(e["text"], e["label"], e["start"], e["end"]) for e in got] == [
            (w["text"], w["label"], w["start"], w["end"]) for w in want]
        assert [e["score"] for e in got] == pytest.approx([w["score"] for w in want], abs=ATOL)
        assert all(e["text"] == text[e["start"]:e["end"]] for e in got)
        total += len(got)
    assert total > 0


# -- Infinity /classify -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/classify", "/v1/classify"])
def test_infinity_classify_shape_key_for_key(extract_server: ExtractServer, path: str) -> None:
    reference = pipeline("text-classification", model=str(extract_server.folders[SENTIMENT]), top_k=None,
                         device="cpu")
    inputs = ["  " + TEXTS[2] + " ", TEXTS[3]]
    response = httpx.post(extract_server.url + path, json={"input": inputs, "model": SENTIMENT}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["object", "data", "model", "usage", "id", "created"]
    assert body["object"] == "classify" and body["model"] == SENTIMENT
    assert body["id"].startswith("infinity-") and len(body["id"]) == len("infinity-") + 36
    assert isinstance(body["created"], int)
    chars = len(TEXTS[2]) + len(TEXTS[3])  # whitespace stripped, as Infinity counts
    assert body["usage"] == {"prompt_tokens": chars, "total_tokens": chars}
    for got, want in zip(body["data"], reference([TEXTS[2], TEXTS[3]]), strict=True):
        assert all(list(entry) == ["score", "label"] for entry in got)
        assert [e["label"] for e in got] == [w["label"] for w in want]
        assert [e["score"] for e in got] == pytest.approx([w["score"] for w in want], abs=ATOL)


def test_infinity_classify_raw_scores_nli_heads_and_capabilities(extract_server: ExtractServer) -> None:
    url = extract_server.url
    raw = httpx.post(f"{url}/classify", json={"input": [TEXTS[0]], "model": SENTIMENT, "raw_scores": True}).json()
    soft = httpx.post(f"{url}/classify", json={"input": [TEXTS[0]], "model": SENTIMENT}).json()
    logits = {e["label"]: e["score"] for e in raw["data"][0]}
    softmax = torch.softmax(torch.tensor([logits["NEGATIVE"], logits["POSITIVE"]]), dim=0).tolist()
    assert {e["label"]: e["score"] for e in soft["data"][0]} == pytest.approx(
        {"NEGATIVE": softmax[0], "POSITIVE": softmax[1]}, abs=ATOL)
    # An NLI head through /classify scores its own labels, as Infinity's text-classification pipeline does.
    nli = httpx.post(f"{url}/classify", json={"input": [TEXTS[0]], "model": NLI})
    assert nli.status_code == 200 and {e["label"] for e in nli.json()["data"][0]} == {
        "entailment", "neutral", "contradiction"}
    capabilities = {m["id"]: m["capabilities"] for m in httpx.get(f"{url}/models").json()["data"]}
    assert capabilities[SENTIMENT] == ["classify"] and capabilities[GLINER] == []
    assert capabilities[CLIP] == ["embed", "image_embed"] and capabilities[CLIP_IMAGES] == ["image_embed"]


# -- CLIP --------------------------------------------------------------------------------------------------------------


IMAGES = {fmt: image_bytes(fmt.upper(), seed=i) for i, fmt in enumerate(["jpeg", "png", "webp"])}


def test_clip_encodes_jpeg_png_webp_and_text_like_the_towers(extract_server: ExtractServer,
                                                             clip_model: tuple[Any, Any]) -> None:
    items = [Item(text="a photo of a cat", id="cat"),
             *(Item(images=[ImageInput(data=data, format=fmt)]) for fmt, data in IMAGES.items())]
    with SIEClient(extract_server.url) as client:
        got = client.encode(CLIP, items)
        half = client.encode(CLIP, items, output_dtype="float16")
    want = [clip_text(clip_model, "a photo of a cat"), *(clip_image(clip_model, d) for d in IMAGES.values())]
    dense = np.stack([r["dense"] for r in got])
    assert dense.dtype == np.float32 and dense.shape == (4, CLIP_DIM)
    np.testing.assert_allclose(dense, np.stack(want), atol=ATOL)
    assert [r.get("id") for r in got] == ["cat", None, None, None]
    assert half[1]["dense"].dtype == np.float16
    np.testing.assert_allclose(np.stack([r["dense"] for r in half]).astype(np.float32), dense, atol=2e-3)


def test_infinity_image_embeddings_from_data_uris(extract_server: ExtractServer,
                                                  clip_model: tuple[Any, Any]) -> None:
    uris = [f"data:image/{fmt};base64,{base64.b64encode(data).decode()}" for fmt, data in IMAGES.items()]
    response = httpx.post(f"{extract_server.url}/embeddings", json={"input": uris, "model": CLIP,
                                                                    "modality": "image"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, np.stack([clip_image(clip_model, d) for d in IMAGES.values()]), atol=ATOL)
    text = httpx.post(f"{extract_server.url}/embeddings", json={"input": "a photo of a cat", "model": CLIP}).json()
    np.testing.assert_allclose(text["data"][0]["embedding"], clip_text(clip_model, "a photo of a cat"),
                               atol=ATOL)


# -- bad input: a coded 4xx, and the workers keep serving -------------------------------------------------------------


def _image(data: bytes) -> dict[str, Any]:
    return {"items": [{"images": [{"data": data, "format": "png"}]}]}


def _uri(data: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(data).decode()}"


# (case, route, body, status, code, message fragment); native bodies go as msgpack, Infinity ones as JSON.
BAD = [
    ("zero-shot without labels", f"/v1/extract/{NLI}", {"items": texts("x")}, 400, "INVALID_INPUT", "needs labels"),
    ("gliner without labels", f"/v1/extract/{GLINER}", {"items": texts("x")}, 400, "INVALID_INPUT", "needs labels"),
    ("over 1000 labels", f"/v1/extract/{NLI}",
     {"items": texts("x"), "params": {"labels": [f"l{i}" for i in range(1001)]}}, 400, "INVALID_INPUT", "1000"),
    ("labels for a fixed-label head", f"/v1/extract/{SENTIMENT}", {"items": texts("x"), "params": {"labels": ["a"]}},
     400, "INVALID_INPUT", "takes no labels"),
    ("corrupt image bytes", f"/v1/encode/{CLIP}", _image(b"definitely not an image"), 400, "INVALID_INPUT",
     "not a decodable image"),
    ("truncated jpeg", f"/v1/encode/{CLIP}", _image(image_bytes("JPEG")[:200]), 400, "INVALID_INPUT",
     "not a decodable image"),
    ("huge image, tiny file", f"/v1/encode/{CLIP}", _image(declared_png(20_000, 20_000)), 400, "INVALID_INPUT",
     "not a decodable image"),
    ("over the configured pixel limit", f"/v1/encode/{CLIP}", _image(declared_png(2_000, 1_000)), 400,
     "INVALID_INPUT", "2000x1000 pixels, over the 1000000-pixel limit"),
    ("neither text nor image", f"/v1/encode/{CLIP}", {"items": [{}]}, 400, "INVALID_INPUT", "neither text nor image"),
    ("text to an image-only model", f"/v1/encode/{CLIP_IMAGES}", {"items": texts("a cat")}, 400, "INVALID_INPUT",
     "not text"),
    ("an image to a text-only model", f"/v1/extract/{SENTIMENT}", _image(IMAGES["png"]), 400, "INVALID_INPUT",
     "does not take image input"),
    ("extract from an encode-only model", f"/v1/extract/{CLIP}", {"items": texts("x")}, 400, "INVALID_INPUT",
     "cannot extract"),
    ("a text over the maximum, overflow_policy error", f"/v1/extract/{NER}",
     {"items": texts("paris is in france " * 200), "params": {"options": {"overflow_policy": "error"}}}, 400,
     "INPUT_TOO_LONG", "over this model's maximum"),
    ("an unknown overflow_policy", f"/v1/extract/{SENTIMENT}",
     {"items": texts("x"), "params": {"options": {"overflow_policy": "drop"}}}, 400, "INVALID_INPUT",
     "overflow_policy must be one of"),
    ("infinity: a remote image URL", "/embeddings",
     {"input": ["https://example.com/cat.png"], "model": CLIP, "modality": "image"}, 400, "INVALID_INPUT",
     "remote image URLs are disabled"),
    ("infinity: a corrupt data URI", "/embeddings",
     {"input": [_uri(b"not an image")], "model": CLIP, "modality": "image"}, 400, "INVALID_INPUT", "ImageCorrupt"),
    ("infinity: a huge image", "/embeddings",
     {"input": [_uri(declared_png(20_000, 20_000))], "model": CLIP, "modality": "image"}, 400, "INVALID_INPUT",
     "ImageCorrupt"),
    ("infinity: text to an image-only model", "/embeddings", {"input": ["a cat"], "model": CLIP_IMAGES}, 400,
     "MODEL_NOT_SUPPORTED", "does not support `embed`"),
    ("infinity: images to a text-only model", "/embeddings",
     {"input": [_uri(IMAGES["png"])], "model": SENTIMENT, "modality": "image"}, 400, "MODEL_NOT_SUPPORTED",
     "no dense output"),
    ("infinity: classify with an NER model", "/classify", {"input": ["x"], "model": NER}, 400, "MODEL_NOT_SUPPORTED",
     "does not support `classify`"),
]


@pytest.fixture(scope="module")
def worker_pids(extract_server: ExtractServer) -> dict[str, int]:
    found = pids(extract_server)
    assert set(found) >= {SENTIMENT, NLI, NER, GLINER, CLIP}
    return found


@pytest.mark.parametrize(("case", "route", "body", "status", "code", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_coded_4xx_and_the_workers_keep_serving(
        extract_server: ExtractServer, worker_pids: dict[str, int], case: str, route: str, body: dict[str, Any],
        status: int, code: str, fragment: str) -> None:
    url = extract_server.url + route
    response = (post_msgpack(url, body) if route.startswith("/v1/")
                else httpx.post(url, json=body, timeout=60))
    assert response.status_code == status, response.text
    assert response.headers["x-sie-error-code"] == code
    assert fragment in response.text
    if route.startswith("/v1/"):
        assert response.json()["detail"]["code"] == code
    else:  # Infinity's handler-error envelope
        assert response.json()["error"]["code"] == status
    now = pids(extract_server)
    assert {m: now.get(m) for m in worker_pids} == worker_pids  # no worker died or restarted
    model = route.rsplit("/", 1)[-1] if route.startswith("/v1/") else body["model"]
    if model in (NLI, GLINER):
        extract(extract_server, model, texts("Alice lives in Paris."), ENTITY_LABELS)
    elif model in (SENTIMENT, NER):
        extract(extract_server, model, texts("Alice lives in Paris."))
    elif model == CLIP:
        ok = post_msgpack(f"{extract_server.url}/v1/encode/{CLIP}", _image(IMAGES["png"]))
        assert ok.status_code == 200, ok.text


def test_every_family_but_gliner_serves_on_the_lean_engine(extract_server: ExtractServer) -> None:
    """A lean family that fell back to torch (an export or a runtime refused) would pass every test above unseen:
    each preloaded model's worker reports its engine, and only GLiNER stays on torch."""
    want = {model: lean_engine() for model in PRELOADED} | {GLINER: "torch"}
    assert {model: extract_server.engines()[model] for model in PRELOADED} == want

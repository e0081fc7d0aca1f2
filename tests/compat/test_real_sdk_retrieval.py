"""The real PyPI sie-sdk 0.10.1 client on sparse, ColBERT, BGE-M3 and cross-encoder models, against references."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from sentence_transformers import CrossEncoder

from tests import precision, references
from tests.compat.conftest import RunScenario
from tests.retrieval_server import BGE_M3, BGE_M3_COLBERT_DIM, COLBERT, RERANKER, SPLADE, RetrievalServer, vocab_size
from tests.tiny_models import COLBERT_DIM

pytestmark = pytest.mark.compat

TEXTS = ["what is the capital of france", "berlin", "paris is the capital and largest city of france",
         "query document passage search retrieval and more words to pass the query cap"]
# Every output type each model offers; ColBERT on both sides.
CALLS = [{"model": SPLADE, "output_types": ["sparse"]},
         {"model": COLBERT, "output_types": ["multivector"], "is_query": True},
         {"model": COLBERT, "output_types": ["multivector"]},
         {"model": BGE_M3, "output_types": ["dense", "sparse", "multivector"]}]
ATOL = precision.TORCH_FLOAT32_ATOL  # not `numeric`: float32 mode only, where lean and torch families agree to this


@pytest.fixture(scope="module")
def sdk_encoded(retrieval_server: RetrievalServer, real_sdk: RunScenario) -> dict[str, Any]:
    return real_sdk(retrieval_server.url, "encode_outputs", calls=CALLS, texts=TEXTS)


def sparse_rows(got: dict[str, Any], call: int, vocab: int) -> np.ndarray:
    rows = np.zeros((len(TEXTS), vocab), dtype=np.float32)
    for i, row in enumerate(rows):
        indices, values = got[f"{call}_indices_{i}"], got[f"{call}_values_{i}"]
        assert indices.dtype == np.int32 and values.dtype == np.float32
        assert np.all(np.diff(indices) > 0) and np.all(values > 0)
        row[indices] = values
    return rows


def test_every_call_returns_exactly_the_requested_outputs(sdk_encoded: dict[str, Any]) -> None:
    for n, call in enumerate(CALLS):
        for i in range(len(TEXTS)):
            assert json.loads(str(sdk_encoded[f"{n}_keys_{i}"])) == sorted(call["output_types"])
    assert json.loads(str(sdk_encoded["sdk_warnings"])) == []


def test_sparse_matches_the_mlm_formula(retrieval_server: RetrievalServer, sdk_encoded: dict[str, Any]) -> None:
    folder = retrieval_server.folders[SPLADE]
    np.testing.assert_allclose(sparse_rows(sdk_encoded, 0, vocab_size(folder)), references.splade(folder, TEXTS),
                               atol=ATOL)


@pytest.mark.parametrize(("call", "is_query"), [(1, True), (2, False)], ids=["query", "doc"])
def test_multivector_matches_colbert(retrieval_server: RetrievalServer, sdk_encoded: dict[str, Any], call: int,
                                     is_query: bool) -> None:
    want = references.colbert("stanford", retrieval_server.folders[COLBERT], TEXTS, is_query)
    for i, rows in enumerate(want):
        got = sdk_encoded[f"{call}_multivector_{i}"]
        assert got.dtype == np.float32 and got.shape == (len(rows), COLBERT_DIM)
        np.testing.assert_allclose(got, rows, atol=ATOL)


def test_hybrid_matches_bge_m3(retrieval_server: RetrievalServer, sdk_encoded: dict[str, Any]) -> None:
    folder = retrieval_server.folders[BGE_M3]
    dense, lexical, colbert = references.bge_m3(folder, TEXTS)
    got_dense = np.stack([sdk_encoded[f"3_dense_{i}"] for i in range(len(TEXTS))])
    assert got_dense.dtype == np.float32
    np.testing.assert_allclose(got_dense, dense, atol=ATOL)
    np.testing.assert_allclose(sparse_rows(sdk_encoded, 3, vocab_size(folder)),
                               references.lexical_rows(lexical, vocab_size(folder)), atol=ATOL)
    for i, rows in enumerate(colbert):
        assert sdk_encoded[f"3_multivector_{i}"].shape == (len(rows), BGE_M3_COLBERT_DIM)
        np.testing.assert_allclose(sdk_encoded[f"3_multivector_{i}"], rows, atol=ATOL)


def test_score_matches_cross_encoder(retrieval_server: RetrievalServer, real_sdk: RunScenario) -> None:
    query, docs = TEXTS[0], [*TEXTS[1:], "berlin is in germany", "france is a country"]
    ids = ["berlin", None, "q-doc", None, "france"]
    got = real_sdk(retrieval_server.url, "score_items", model=RERANKER, query=query, docs=docs, ids=ids)
    want = CrossEncoder(str(retrieval_server.folders[RERANKER]), device="cpu").predict([(query, d) for d in docs])
    order = np.argsort(-want, kind="stable")
    names = [item_id or f"item-{i}" for i, item_id in enumerate(ids)]
    assert str(got["model"]) == RERANKER and str(got["query_id"]) == "q1"
    assert got["ranks"].tolist() == list(range(len(docs)))
    assert got["item_ids"].tolist() == [names[i] for i in order]
    np.testing.assert_allclose(got["scores"], want[order], atol=ATOL)

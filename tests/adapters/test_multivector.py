"""The ColBERT adapter against a hand-written ColBERT on both checkpoint layouts (CPU).

The reference follows PyLate's `ColBERT.encode`: it inserts the marker token id after [CLS] (so it also checks the
adapter's text-prefix tokenisation), expands queries with [MASK] and drops punctuation rows from documents.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sie_sdk.scoring import maxsim
from sie_worker.adapters.base import InputTooLong, UnsupportedTask
from sie_worker.adapters.colbert_config import checkpoint_defaults
from sie_worker.st_layout import read_layout
from tests.adapters.conftest import MakeAdapter, encode, multivector_items
from tests.references import colbert as reference
from tests.sentences import SENTENCES
from tests.tiny_models import COLBERT_DIM

QUERIES = ["what is the capital of france", "berlin", "query document passage search retrieval and more words"]
# More than one micro-batch (16 items) of mixed lengths, so length bucketing and reordering are exercised.
DOCS = ["paris is the capital and largest city of france", *SENTENCES[:30]]
# layout -> the fixture that builds its tiny checkpoint
LAYOUTS = {"stanford": "colbert_stanford_dir", "pylate": "colbert_pylate_dir"}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("is_query", [True, False], ids=["query", "doc"])
def test_matches_the_reference(layout: str, is_query: bool, make_adapter: MakeAdapter,
                               request: pytest.FixtureRequest) -> None:
    weights_dir = request.getfixturevalue(LAYOUTS[layout])
    texts = QUERIES if is_query else DOCS
    result = encode(make_adapter("multivector", weights_dir), texts, ["multivector"], is_query=is_query)
    got, expected = multivector_items(result), reference(layout, weights_dir, texts, is_query)
    assert [len(rows) for rows in got] == [len(rows) for rows in expected]
    if is_query:  # every query is expanded to its cap; token_counts still counts its real tokens
        assert {len(rows) for rows in got} == {8} and max(result.token_counts) <= 8 > min(result.token_counts)
    else:  # punctuation rows dropped, so some documents return fewer rows than they have tokens
        assert all(len(r) <= n for r, n in zip(got, result.token_counts, strict=True))
        assert any(len(r) < n for r, n in zip(got, result.token_counts, strict=True))
    for rows, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(rows, want, atol=1e-5)
    assert result.dense is None and result.sparse_indices is None


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reports_token_dims(layout: str, make_adapter: MakeAdapter, request: pytest.FixtureRequest) -> None:
    adapter = make_adapter("multivector", request.getfixturevalue(LAYOUTS[layout]))
    info = adapter.load()
    assert info.dims == {"multivector": COLBERT_DIM} and info.capabilities == ["multivector"]
    rows = multivector_items(encode(adapter, ["berlin"], ["multivector"]))[0]
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


def test_queries_are_capped_and_options_override_the_checkpoint(make_adapter: MakeAdapter,
                                                                colbert_pylate_dir: Path) -> None:
    long_query = "berlin is in germany " * 20
    capped = make_adapter("multivector", colbert_pylate_dir)
    assert encode(capped, [long_query], ["multivector"], is_query=True).token_counts == [8]
    # a query is cut at its cap whatever `truncate` says: the cap is part of how ColBERT encodes queries
    assert encode(capped, [long_query], ["multivector"], is_query=True,
                  options={"truncate": False}).token_counts == [8]
    wider = make_adapter("multivector", colbert_pylate_dir, options={"query_max_length": 12})
    assert encode(wider, [long_query], ["multivector"], is_query=True).token_counts == [12]
    with pytest.raises(InputTooLong):
        encode(capped, [long_query * 3], ["multivector"], options={"truncate": False})


def test_query_and_doc_markers_differ(make_adapter: MakeAdapter, colbert_stanford_dir: Path) -> None:
    adapter = make_adapter("multivector", colbert_stanford_dir)
    query = multivector_items(encode(adapter, ["berlin"], ["multivector"], is_query=True))[0]
    doc = multivector_items(encode(adapter, ["berlin"], ["multivector"]))[0]
    assert doc.shape == (4, COLBERT_DIM)  # [CLS] marker berlin [SEP]
    assert query.shape == (8, COLBERT_DIM)  # the same, then [MASK] up to the query cap
    assert not np.allclose(query[:4], doc)


def test_rejects_a_token_dim_the_checkpoint_does_not_have(make_adapter: MakeAdapter,
                                                          colbert_stanford_dir: Path) -> None:
    with pytest.raises(ValueError, match="token_dim"):
        make_adapter("multivector", colbert_stanford_dir, options={"token_dim": 128})


def test_maxsim_ranks_with_the_encoded_vectors(make_adapter: MakeAdapter, colbert_pylate_dir: Path) -> None:
    adapter = make_adapter("multivector", colbert_pylate_dir)
    query = multivector_items(encode(adapter, QUERIES[:1], ["multivector"], is_query=True))[0]
    docs = multivector_items(encode(adapter, DOCS, ["multivector"]))
    want = [float(torch.from_numpy(query @ d.T).max(dim=1).values.sum()) for d in docs]
    np.testing.assert_allclose(maxsim(query, docs), want, rtol=1e-6)
    with pytest.raises(UnsupportedTask):
        encode(adapter, ["text"], ["dense"])


def test_expansion_attention_and_skiplist_follow_the_options(make_adapter: MakeAdapter,
                                                             colbert_pylate_dir: Path) -> None:
    query, doc = "berlin is in germany", "paris, the capital of france."

    def rows(adapter: object, text: str, is_query: bool) -> np.ndarray:
        return multivector_items(encode(adapter, [text], ["multivector"], is_query=is_query))[0]

    default = make_adapter("multivector", colbert_pylate_dir)
    expanded, full_doc = rows(default, query, True), rows(default, doc, False)
    plain = make_adapter("multivector", colbert_pylate_dir, options={"query_expansion": False})
    unexpanded = rows(plain, query, True)
    assert len(expanded) == 8 and len(unexpanded) == 7  # [CLS] [Q] berlin is in germany [SEP]
    # The real tokens do not attend to the [MASK]s, so their rows are the same with or without them...
    np.testing.assert_allclose(expanded[:7], unexpanded, atol=1e-5)
    # ...unless the checkpoint says they do.
    attending = make_adapter("multivector", colbert_pylate_dir, options={"attend_to_expansion_tokens": True})
    assert not np.allclose(rows(attending, query, True)[:7], unexpanded, atol=1e-5)
    no_skiplist = make_adapter("multivector", colbert_pylate_dir, options={"skiplist_words": []})
    assert len(rows(no_skiplist, doc, False)) == len(full_doc) + 2  # the comma and the full stop


def test_checkpoint_configs_set_expansion_attention_and_skiplist(tmp_path: Path) -> None:
    pylate, stanford = tmp_path / "pylate", tmp_path / "stanford"
    pylate.mkdir(), stanford.mkdir()
    (pylate / "config_sentence_transformers.json").write_text(json.dumps(
        {"do_query_expansion": False, "attend_to_expansion_tokens": True, "skiplist_words": ["!"]}))
    assert checkpoint_defaults(read_layout(pylate)) == {"query_expansion": False, "attend_to_expansion_tokens": True,
                                           "skiplist_words": ["!"]}
    (stanford / "artifact.metadata").write_text(json.dumps({"attend_to_mask_tokens": True,
                                                            "mask_punctuation": False}))
    assert checkpoint_defaults(read_layout(stanford)) == {"query_prefix": "[unused0] ", "doc_prefix": "[unused1] ",
                                             "attend_to_expansion_tokens": True, "skiplist_words": []}

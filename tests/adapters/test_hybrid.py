"""The BGE-M3 hybrid adapter against FlagEmbedding's BGE-M3 formulas, written out in tests/references.py (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from sie_worker import protocol
from sie_worker.adapters.base import UnsupportedTask
from sie_worker.protocol import BatchDone, ScoreBatch
from tests.adapters.conftest import MakeAdapter, encode, multivector_items, sparse_items
from tests.references import bge_m3 as reference
from tests.sentences import SENTENCES

# More than one micro-batch (16 items) of mixed lengths, so length bucketing and reordering are exercised.
TEXTS = ["what is the capital of france", *SENTENCES[:30], "berlin"]
ALL = ["dense", "sparse", "multivector"]


def test_matches_bge_m3(make_adapter: MakeAdapter, bge_m3_dir: Path) -> None:
    adapter = make_adapter("hybrid", bge_m3_dir)
    result = encode(adapter, TEXTS, ALL)
    dense, lexical, colbert = reference(bge_m3_dir, TEXTS)
    assert result.dense is not None
    np.testing.assert_allclose(result.dense.numpy(), dense, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(bge_m3_dir)
    sparse = sparse_items(result, len(tokenizer))
    specials = [tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    assert not sparse[:, specials].any() and sparse.any()
    for row, want in zip(sparse, lexical, strict=True):
        expected = np.zeros_like(row)
        expected[list(want)] = list(want.values())
        np.testing.assert_allclose(row, expected, atol=1e-5)
    for rows, want in zip(multivector_items(result), colbert, strict=True):
        np.testing.assert_allclose(rows, want, atol=1e-5)


def test_returns_only_the_requested_outputs(make_adapter: MakeAdapter, bge_m3_dir: Path) -> None:
    adapter = make_adapter("hybrid", bge_m3_dir)
    full = encode(adapter, TEXTS, ALL)
    sparse_only = encode(adapter, TEXTS, ["sparse"])
    assert sparse_only.dense is None and sparse_only.multivector is None
    assert sparse_only.sparse_offsets == full.sparse_offsets
    dense_mv = encode(adapter, TEXTS, ["dense", "multivector"])
    assert dense_mv.sparse_indices is None and dense_mv.dense is not None
    assert dense_mv.multivector_offsets == full.multivector_offsets
    assert dense_mv.token_counts == full.token_counts


def test_results_cross_zeromq_intact(make_adapter: MakeAdapter, bge_m3_dir: Path) -> None:
    result = encode(make_adapter("hybrid", bge_m3_dir), TEXTS, ALL)
    decoded = protocol.decode_for_router(protocol.encode(BatchDone(batch_id=1, result=result)))
    assert isinstance(decoded, BatchDone) and decoded.result == result


def test_reports_three_outputs(make_adapter: MakeAdapter, bge_m3_dir: Path) -> None:
    adapter = make_adapter("hybrid", bge_m3_dir)
    info = adapter.load()
    vocab = len(AutoTokenizer.from_pretrained(bge_m3_dir))
    assert info.dims == {"dense": 32, "sparse": vocab, "multivector": 24}
    assert info.capabilities == ALL
    with pytest.raises(UnsupportedTask):
        adapter.prepare(ScoreBatch(batch_id=1, pairs=[("q", "d")]))
    with pytest.raises(UnsupportedTask):
        encode(adapter, ["text"], ["embeddings"])

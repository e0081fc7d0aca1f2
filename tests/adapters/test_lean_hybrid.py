"""The lean BGE-M3 adapter (`lean_hybrid`) on the tiny checkpoint: FlagEmbedding's formulas (tests/references.py) on
each engine, the torch hybrid adapter's options and refusals, and the heads' files in the graph cache (a rewritten head
exports again)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from sie_worker.adapters import graph_cache
from sie_worker.adapters.base import InputTooLong, UnsupportedTask
from sie_worker.adapters.hybrid import HybridAdapter
from sie_worker.adapters.lean_hybrid import LeanHybridAdapter
from sie_worker.protocol import EncodeResult, ScoreBatch
from tests import declared, precision
from tests.adapters.conftest import MakeAdapter, encode, multivector_items, sparse_items
from tests.adapters.test_lean_families import ENGINES, lean
from tests.references import bge_m3 as reference
from tests.references import lexical_rows
from tests.sentences import SENTENCES

declared.module("openvino")
declared.module("onnxruntime")

# More than one micro-batch (16 items) of mixed lengths, so length bucketing and reordering are exercised.
TEXTS = ["what is the capital of france", *SENTENCES[:30], "berlin"]
ALL = ["dense", "sparse", "multivector"]
LONG = [" ".join(SENTENCES[:6]), " ".join(SENTENCES[6:9]), "short"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("graphs")


def assert_sparse_close(got: np.ndarray, want: np.ndarray, tol: precision.Tolerance) -> None:
    """[items, vocab] weights row by row, leaving out the items without a positive weight on either side (a short text
    under random heads): all zeros, equal, and of no direction to take a cosine of."""
    weighted = got.any(axis=1) | want.any(axis=1)
    assert weighted.any()
    precision.assert_vectors_close(got[weighted], want[weighted], tol)


def assert_matches_reference(result: EncodeResult, weights: Path, texts: list[str], vocab: int,
                             tol: precision.Tolerance) -> None:
    dense, lexical, colbert = reference(weights, texts)
    assert result.dense is not None
    precision.assert_vectors_close(result.dense.numpy(), dense, tol)
    assert_sparse_close(sparse_items(result, vocab), lexical_rows(lexical, vocab), tol)
    got = multivector_items(result)
    assert [len(rows) for rows in got] == [len(rows) for rows in colbert]
    precision.assert_vectors_close(np.concatenate(got), np.concatenate(colbert), tol)


@pytest.mark.numeric
@pytest.mark.parametrize(("engine", "dtype"), ENGINES)
def test_lean_bge_m3_computes_the_bge_m3_formulas(make_adapter: MakeAdapter, bge_m3_dir: Path, cache: Path,
                                                   engine: str, dtype: precision.Precision) -> None:
    """Dense, sparse (special ids never weighted) and multivector, within the bars of the precision computed in."""
    adapter = lean(make_adapter, "hybrid", bge_m3_dir, cache, engine, compute_precision=dtype)
    assert isinstance(adapter, LeanHybridAdapter)
    info = adapter.load()
    assert (info.engine, info.precision) == (engine, dtype)
    torch_info = make_adapter("hybrid", bge_m3_dir).load()
    assert (info.dims, info.capabilities, info.max_sequence_length) == (
        torch_info.dims, torch_info.capabilities, torch_info.max_sequence_length)
    result = encode(adapter, TEXTS, ALL)
    assert_matches_reference(result, bge_m3_dir, TEXTS, info.dims["sparse"], precision.tolerance(dtype))
    tokenizer = AutoTokenizer.from_pretrained(bge_m3_dir)
    specials = [tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    assert not sparse_items(result, info.dims["sparse"])[:, specials].any()


def test_returns_only_the_requested_outputs_and_refuses_as_torch(make_adapter: MakeAdapter, bge_m3_dir: Path,
                                                                  cache: Path) -> None:
    adapter = lean(make_adapter, "hybrid", bge_m3_dir, cache, "onnx")
    full = encode(adapter, TEXTS, ALL)
    sparse_only = encode(adapter, TEXTS, ["sparse"])
    assert sparse_only.dense is None and sparse_only.multivector is None
    assert sparse_only.sparse_offsets == full.sparse_offsets
    dense_mv = encode(adapter, TEXTS, ["dense", "multivector"])
    assert dense_mv.sparse_indices is None and dense_mv.multivector_offsets == full.multivector_offsets
    with pytest.raises(UnsupportedTask, match="only encodes"):
        adapter.prepare(ScoreBatch(batch_id=1, pairs=[("q", "d")]))
    with pytest.raises(UnsupportedTask, match="embeddings"):
        encode(adapter, ["text"], ["embeddings"])


@pytest.mark.numeric
@pytest.mark.parametrize("side", ["right", "left"])
def test_truncates_as_the_torch_adapter(side: str, make_adapter: MakeAdapter, bge_m3_dir: Path,
                                        cache: Path) -> None:
    """Texts over max_sequence_length are cut from the side asked for, or refused where `truncate` is false."""
    lean_adapter = lean(make_adapter, "hybrid", bge_m3_dir, cache, "onnx", max_sequence_length=24)
    torch_adapter = make_adapter("hybrid", bge_m3_dir, max_sequence_length=24)
    assert isinstance(lean_adapter, LeanHybridAdapter) and isinstance(torch_adapter, HybridAdapter)
    got, want = (encode(a, LONG, ALL, options={"truncation_direction": side}) for a in (lean_adapter, torch_adapter))
    assert got.token_counts == want.token_counts and got.token_counts[:2] == [24, 24]
    tol = precision.tolerance("float32")
    precision.assert_vectors_close(got.dense.numpy(), want.dense.numpy(), tol)
    vocab = lean_adapter.vocab_size
    assert_sparse_close(sparse_items(got, vocab), sparse_items(want, vocab), tol)
    assert got.multivector_offsets == want.multivector_offsets
    precision.assert_vectors_close(got.multivector.numpy(), want.multivector.numpy(), tol)
    for adapter in (lean_adapter, torch_adapter):
        with pytest.raises(InputTooLong):
            encode(adapter, LONG, ALL, options={"truncate": False})


@pytest.mark.numeric
def test_a_rewritten_head_file_exports_again(make_adapter: MakeAdapter, bge_m3_dir: Path, tmp_path: Path) -> None:
    """The cache key covers the `.pt` heads, and the heads' arrays are part of a complete graph folder."""
    weights, cache = tmp_path / "bge_m3", tmp_path / "graphs"
    shutil.copytree(bge_m3_dir, weights)
    first = lean(make_adapter, "hybrid", weights, cache, "onnx")
    before = encode(first, TEXTS, ["sparse"])
    torch.manual_seed(1)
    torch.save(torch.nn.Linear(32, 1).state_dict(), weights / "sparse_linear.pt")
    second = lean(make_adapter, "hybrid", weights, cache, "onnx")
    assert second.session.graph.folder != first.session.graph.folder
    vocab = second.vocab_size
    after = encode(second, TEXTS, ALL)
    assert not np.allclose(sparse_items(after, vocab), sparse_items(before, vocab))
    assert_matches_reference(after, weights, TEXTS, vocab, precision.tolerance("float32"))
    heads = second.session.graph.folder / graph_cache.HYBRID_HEADS
    heads.write_bytes(heads.read_bytes()[:-1])
    assert graph_cache.read_graph(second.session.graph.folder) is None, "a cut heads file is an incomplete graph"

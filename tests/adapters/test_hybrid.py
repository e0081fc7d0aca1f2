"""The BGE-M3 hybrid adapter against FlagEmbedding's BGE-M3 formulas, written out here (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from sie_worker.adapters.base import UnsupportedTask
from sie_worker import protocol
from sie_worker.protocol import BatchDone, ScoreBatch
from tests.adapters.conftest import MakeAdapter, encode, multivector_items, sparse_items
from tests.sentences import SENTENCES

# More than one micro-batch (16 items) of mixed lengths, so length bucketing and reordering are exercised.
TEXTS = ["what is the capital of france", *SENTENCES[:30], "berlin"]
ALL = ["dense", "sparse", "multivector"]


def linear(path: Path) -> torch.nn.Linear:
    state = torch.load(path, map_location="cpu", weights_only=True)
    layer = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    layer.load_state_dict(state)
    return layer.eval()


def reference(weights_dir: Path, texts: list[str]) -> tuple[np.ndarray, list[dict[int, float]], list[np.ndarray]]:
    """(dense, sparse as {token id: weight}, colbert rows) as `BGEM3FlagModel.encode` computes them."""
    tokenizer = AutoTokenizer.from_pretrained(weights_dir)
    model = AutoModel.from_pretrained(weights_dir).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=126, return_tensors="pt")
    mask = encoded["attention_mask"]
    with torch.inference_mode():
        hidden = model(**encoded).last_hidden_state
        dense = F.normalize(hidden[:, 0], dim=-1)
        token_weights = torch.relu(linear(weights_dir / "sparse_linear.pt")(hidden))
        colbert = linear(weights_dir / "colbert_linear.pt")(hidden[:, 1:]) * mask[:, 1:][:, :, None].float()
        colbert = F.normalize(colbert, dim=-1)
    unused = {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    lexical: list[dict[int, float]] = []
    for weights, ids in zip(token_weights.squeeze(-1).tolist(), encoded["input_ids"].tolist(), strict=True):
        found: dict[int, float] = {}
        for w, idx in zip(weights, ids, strict=True):
            if idx not in unused and w > 0 and w > found.get(idx, 0.0):
                found[idx] = w
        lexical.append(found)
    tokens = mask.sum(dim=1).tolist()
    return dense.numpy(), lexical, [colbert[i, :tokens[i] - 1].numpy() for i in range(len(texts))]


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

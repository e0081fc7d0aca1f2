"""The SPLADE adapter against the formula in plain transformers and sentence-transformers' SparseEncoder (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from sie_worker.adapters.base import InputTooLong, UnsupportedTask
from sie_worker.protocol import ScoreBatch
from tests.adapters.conftest import MakeAdapter, encode, sparse_items
from tests.references import splade as reference
from tests.sentences import SENTENCES

# More than one micro-batch (16 items) of mixed lengths, so length bucketing and reordering are exercised.
TEXTS = ["what is the capital of france", *SENTENCES[:30], "berlin"]


def test_matches_the_mlm_formula(make_adapter: MakeAdapter, mlm_dir: Path) -> None:
    adapter = make_adapter("sparse", mlm_dir)
    result = encode(adapter, TEXTS, ["sparse"])
    expected = reference(mlm_dir, TEXTS)
    np.testing.assert_allclose(sparse_items(result, expected.shape[1]), expected, atol=1e-5)
    assert result.dense is None and result.multivector is None


def test_matches_sentence_transformers_sparse_encoder(make_adapter: MakeAdapter, mlm_dir: Path) -> None:
    from sentence_transformers import SparseEncoder

    expected = SparseEncoder(str(mlm_dir), device="cpu").encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    result = encode(make_adapter("sparse", mlm_dir), TEXTS, ["sparse"])
    np.testing.assert_allclose(sparse_items(result, expected.shape[1]), expected, atol=1e-5)


@pytest.mark.parametrize(("strategy", "activation"), [("max", "log1p_relu"), ("sum", "relu")])
def test_follows_the_splade_pooling_of_a_sentence_transformers_checkpoint(
        strategy: str, activation: str, make_adapter: MakeAdapter, mlm_dir: Path, tmp_path: Path) -> None:
    from sentence_transformers import SparseEncoder

    reference = SparseEncoder(str(mlm_dir), device="cpu")
    reference[1].pooling_strategy, reference[1].activation_function = strategy, activation
    reference.save(str(tmp_path))  # modules.json + 1_SpladePooling/config.json, as naver/splade-v3 ships
    expected = reference.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    result = encode(make_adapter("sparse", tmp_path), TEXTS, ["sparse"])
    np.testing.assert_allclose(sparse_items(result, expected.shape[1]), expected, atol=1e-5)


def test_reports_vocabulary_dims_and_token_counts(make_adapter: MakeAdapter, mlm_dir: Path) -> None:
    adapter = make_adapter("sparse", mlm_dir)
    tokenizer = AutoTokenizer.from_pretrained(mlm_dir)
    info = adapter.load()
    assert info.dims == {"sparse": len(tokenizer)} and info.capabilities == ["sparse"]
    result = encode(adapter, TEXTS, ["sparse"])
    assert result.token_counts == [len(ids) for ids in tokenizer(TEXTS)["input_ids"]]


def test_truncates_to_max_sequence_length_unless_asked_not_to(make_adapter: MakeAdapter, mlm_dir: Path) -> None:
    adapter = make_adapter("sparse", mlm_dir, max_sequence_length=8)
    long_a, long_b = "berlin is in germany " * 10, "berlin is in germany " * 10 + "and paris is in france"
    result = encode(adapter, [long_a, long_b], ["sparse"])
    assert result.token_counts == [8, 8]
    rows = sparse_items(result, len(AutoTokenizer.from_pretrained(mlm_dir)))
    np.testing.assert_allclose(rows[0], rows[1], atol=1e-6)
    np.testing.assert_allclose(rows, reference(mlm_dir, [long_a, long_b], max_length=8), atol=1e-5)
    with pytest.raises(InputTooLong, match="tokens long"):
        encode(adapter, [long_a], ["sparse"], options={"truncate": False})


def test_refuses_what_it_cannot_do(make_adapter: MakeAdapter, mlm_dir: Path) -> None:
    adapter = make_adapter("sparse", mlm_dir)
    with pytest.raises(UnsupportedTask):
        adapter.prepare(ScoreBatch(batch_id=1, pairs=[("q", "d")]))
    with pytest.raises(UnsupportedTask):
        encode(adapter, ["text"], ["dense"])


def test_real_tiny_splade_finds_the_query_terms(make_adapter: MakeAdapter, splade_dir: Path) -> None:
    query = "what is the capital of france"
    adapter = make_adapter("sparse", splade_dir)
    result = encode(adapter, [query, "paris"], ["sparse"])
    tokenizer = AutoTokenizer.from_pretrained(splade_dir)
    row = sparse_items(result, len(tokenizer))[0]
    top = [tokenizer.convert_ids_to_tokens(int(i)) for i in np.argsort(-row)[:4]]
    assert {"capital", "france"} <= set(top), top
    np.testing.assert_allclose(sparse_items(result, len(tokenizer)), reference(splade_dir, [query, "paris"]),
                               atol=1e-5)

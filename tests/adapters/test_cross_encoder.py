"""The cross-encoder adapter against sentence-transformers' `CrossEncoder.predict` on the same checkpoint (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

from sie_worker.adapters.base import InputTooLong, UnsupportedTask
from tests.adapters.conftest import MakeAdapter, encode, score
from tests.sentences import SENTENCES

PAIRS = [("what is the capital of france", doc) for doc in ["paris is the capital and largest city of france",
                                                             "berlin is in germany", *SENTENCES[:30]]]


def test_matches_cross_encoder_predict(make_adapter: MakeAdapter, cross_encoder_dir: Path) -> None:
    reference = CrossEncoder(str(cross_encoder_dir), device="cpu")
    result = score(make_adapter("cross_encoder", cross_encoder_dir), PAIRS)
    scores, raw = result.scores.numpy(), result.raw.numpy()
    assert scores.dtype == raw.dtype == np.float32 and scores.shape == (len(PAIRS),)
    np.testing.assert_allclose(scores, reference.predict(PAIRS), atol=1e-5)
    np.testing.assert_allclose(raw, reference.predict(PAIRS, activation_fn=torch.nn.Identity()), atol=1e-5)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-raw)), atol=1e-6)


def test_truncates_pairs_as_the_reference_does(make_adapter: MakeAdapter, cross_encoder_dir: Path) -> None:
    long_pairs = [(q, doc * 5) for q, doc in PAIRS]
    reference = CrossEncoder(str(cross_encoder_dir), device="cpu", max_length=24)
    adapter = make_adapter("cross_encoder", cross_encoder_dir, max_sequence_length=24)
    result = score(adapter, long_pairs)
    assert result.token_counts == [24] * len(long_pairs)
    np.testing.assert_allclose(result.scores.numpy(), reference.predict(long_pairs), atol=1e-5)
    with pytest.raises(InputTooLong):
        score(adapter, long_pairs, options={"truncate": False})


def test_only_scores(make_adapter: MakeAdapter, cross_encoder_dir: Path) -> None:
    adapter = make_adapter("cross_encoder", cross_encoder_dir)
    info = adapter.load()
    assert info.capabilities == ["score"] and info.dims == {}
    with pytest.raises(UnsupportedTask):
        encode(adapter, ["text"], ["dense"])

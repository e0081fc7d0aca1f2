"""`sie_sdk.scoring.maxsim`: ColBERT late-interaction scores on the client (SDK, numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from sie_sdk.scoring import maxsim


def brute_force(query: np.ndarray, doc: np.ndarray) -> float:
    return float(sum(max(float(np.dot(q, d)) for d in doc) for q in query))


def test_sums_the_best_match_of_each_query_token() -> None:
    query = np.array([[1, 0], [0, 1]], dtype=np.float32)
    doc = np.array([[0.5, 0.5], [0.9, -0.1], [0.0, 0.2]], dtype=np.float32)
    assert maxsim(query, [doc]) == pytest.approx([0.9 + 0.5])


def test_matches_a_brute_force_loop_for_random_vectors() -> None:
    rng = np.random.default_rng(0)
    query = rng.standard_normal((7, 16)).astype(np.float32)
    docs = [rng.standard_normal((n, 16)).astype(np.float32) for n in (1, 5, 40)]
    np.testing.assert_allclose(maxsim(query, docs), [brute_force(query, d) for d in docs], rtol=1e-5)


def test_is_float32_and_order_free_over_document_tokens() -> None:
    rng = np.random.default_rng(1)
    query = rng.standard_normal((4, 8))  # float64 in: computed in float32
    doc = rng.standard_normal((9, 8))
    [score] = maxsim(query, [doc])
    [shuffled] = maxsim(query, [doc[::-1]])
    assert isinstance(score, float) and score == shuffled
    assert score == float((query.astype(np.float32) @ doc.astype(np.float32).T).max(axis=1).sum(dtype=np.float32))


def test_identical_unit_vectors_score_their_token_count() -> None:
    rows = np.eye(5, dtype=np.float32)[:3]
    assert maxsim(rows, [rows]) == pytest.approx([3.0])


def test_edge_cases() -> None:
    query = np.ones((2, 4), dtype=np.float32)
    assert maxsim(query, []) == []
    assert maxsim(query, [np.empty((0, 4), dtype=np.float32)]) == [0.0]
    with pytest.raises(ValueError, match="does not match"):
        maxsim(query, [np.ones((3, 5), dtype=np.float32)])
    with pytest.raises(ValueError, match="tokens, dims"):
        maxsim(np.ones(4, dtype=np.float32), [query])

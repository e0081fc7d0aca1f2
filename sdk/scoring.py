"""Late-interaction scoring on the client side (SDK, any process): MaxSim over multivector outputs."""

from __future__ import annotations

import numpy as np


def maxsim(query: np.ndarray, docs: list[np.ndarray]) -> list[float]:
    """ColBERT MaxSim of one query [q, d] against each document [t, d]: per query token, the best dot product over
    the document's tokens, summed over query tokens, in float32. A document with no tokens scores 0."""
    q = np.asarray(query, dtype=np.float32)
    if q.ndim != 2:
        raise ValueError(f"query must be [tokens, dims], got shape {q.shape}")
    return [_maxsim_one(q, np.asarray(doc, dtype=np.float32)) for doc in docs]


def _maxsim_one(query: np.ndarray, doc: np.ndarray) -> float:
    if doc.ndim != 2 or doc.shape[1] != query.shape[1]:
        raise ValueError(f"document shape {doc.shape} does not match query dims {query.shape[1]}")
    if doc.shape[0] == 0 or query.shape[0] == 0:
        return 0.0
    return float((query @ doc.T).max(axis=1).sum(dtype=np.float32))

"""Packing per-item outputs into the wire's CSR layouts (worker process, free of torch, so that torch and lean
adapters share it): sparse rows as indices, values and offsets; per-token rows as one matrix and offsets."""

from __future__ import annotations

import numpy as np

from sie_worker.protocol import Tensor

SparseRow = tuple[np.ndarray, np.ndarray]


def positive_rows(weights: np.ndarray) -> list[SparseRow]:
    """Each row of a [B, V] matrix as (int32 ascending indices, float32 values) of its entries > 0."""
    rows = []
    for row in weights:
        (indices,) = np.nonzero(row > 0)
        rows.append((indices.astype(np.int32), row[indices].astype(np.float32)))
    return rows


def join_sparse(parts: list[SparseRow]) -> tuple[Tensor, Tensor, list[int]]:
    """Rows in item order, packed CSR: indices, values, offsets (item i owns offsets[i]:offsets[i + 1])."""
    offsets = np.cumsum([0] + [len(indices) for indices, _ in parts]).tolist()
    indices = np.concatenate([np.empty(0, np.int32)] + [i for i, _ in parts])
    values = np.concatenate([np.empty(0, np.float32)] + [v for _, v in parts])
    return Tensor.from_numpy(indices), Tensor.from_numpy(values), [int(o) for o in offsets]


def join_rows(parts: list[np.ndarray], dim: int) -> tuple[Tensor, list[int]]:
    """Per-item rows in item order as one [sum rows, D] array plus CSR offsets (item i owns offsets[i]:offsets[i+1])."""
    offsets = np.cumsum([0] + [len(rows) for rows in parts]).tolist()
    return Tensor.from_numpy(np.concatenate([np.empty((0, dim), np.float32), *parts])), [int(o) for o in offsets]

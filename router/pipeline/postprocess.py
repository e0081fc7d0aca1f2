"""Output post-processing in numpy (router process): quantisation (`output_dtype`) and `dimensions` cuts."""

from __future__ import annotations

import numpy as np

WIRE_DTYPE_NAMES = {"float32": "float32", "float16": "float16", "int8": "int8", "uint8": "uint8",
                    "binary": "binary", "ubinary": "binary"}


def quantize(rows: np.ndarray, output_dtype: str) -> np.ndarray:
    """Quantise the last axis of `rows` (a vector, or one row per token) as SIE 0.10.1 does; zero rows stay zero."""
    if output_dtype == "float32":
        return rows.astype(np.float32, copy=False)
    if output_dtype == "float16":
        return rows.astype(np.float16)
    if output_dtype == "int8":
        scale = np.abs(rows).max(axis=-1, keepdims=True)
        safe = np.where(scale > 0, scale, 1.0)
        return np.round(rows / safe * 127).astype(np.int8)
    if output_dtype == "uint8":
        low = rows.min(axis=-1, keepdims=True)
        span = rows.max(axis=-1, keepdims=True) - low
        safe = np.where(span > 0, span, 1.0)
        return np.where(span > 0, np.round((rows - low) / safe * 255), 0).astype(np.uint8)
    if output_dtype in ("binary", "ubinary"):
        return np.packbits(rows > 0, axis=-1)
    raise ValueError(f"unknown output_dtype {output_dtype!r}")


def cut_dimensions(vectors: np.ndarray, dimensions: int, renormalize: bool) -> np.ndarray:
    """The first `dimensions` values of each vector, L2-renormalised when asked (OpenAI semantics)."""
    cut = vectors[..., :dimensions]
    if not renormalize:
        return cut
    norms = np.linalg.norm(cut, axis=-1, keepdims=True)
    return cut / np.where(norms > 0, norms, 1.0)

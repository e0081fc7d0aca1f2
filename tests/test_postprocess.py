"""Quantisation and `dimensions` cuts, as SIE 0.10.1 and OpenAI define them."""

from __future__ import annotations

import numpy as np

from sie_router.pipeline.postprocess import cut_dimensions, quantize


def test_quantisations() -> None:
    x = np.array([[0.5, -1.0, 0.25, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, "int8"), [[64, -127, 32, 0]])
    np.testing.assert_array_equal(quantize(x, "uint8"), [[255, 0, 212, 170]])
    np.testing.assert_array_equal(quantize(x, "binary"), np.packbits(x > 0, axis=-1))
    assert quantize(x, "float16").dtype == np.float16


def test_zero_rows_do_not_divide_by_zero() -> None:
    zeros = np.zeros((1, 8), dtype=np.float32)
    for dtype in ("int8", "uint8"):
        assert not quantize(zeros, dtype).any()


def test_cut_dimensions_renormalises_only_when_asked() -> None:
    v = np.array([[0.6, 0.8, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(cut_dimensions(v, 1, renormalize=True), [[1.0]])
    np.testing.assert_allclose(cut_dimensions(v, 1, renormalize=False), [[0.6]])

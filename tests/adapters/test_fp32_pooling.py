"""Pooling and normalisation run in float32 for every family, whatever the model's dtype: fp16 tensors on the CPU,
8192 tokens near 9 (a long BGE-M3 input), must give finite vectors equal to the float32 computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sie_worker.adapters.clip_inputs import pool_images
from sie_worker.adapters.cross_encoder import scores_from_logits
from sie_worker.adapters.dense import pool
from sie_worker.adapters.hybrid import colbert_vectors, dense_vectors, sparse_weights
from sie_worker.adapters.multivector import Projection, project
from sie_worker.adapters.sparse import splade_pool

TOKENS, HIDDEN = 8192, 64


def near_nine(*shape: int) -> torch.Tensor:
    """float16 values in [8.5, 9.5): their sum over 8192 tokens (about 73 700) is over fp16's largest, 65 504."""
    generator = torch.Generator().manual_seed(0)
    return (8.5 + torch.rand(*shape, generator=generator)).half()


def assert_matches(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """float32, finite, and equal to the float32 computation (`rtol` allows for fp16 rounding of each element, where a
    head or activation runs in the model's dtype before pooling)."""
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("how", ["mean", "cls", "lasttoken", "max", "mean_sqrt_len_tokens", "weightedmean"])
def test_dense_pooling(how: str) -> None:
    hidden, mask = near_nine(2, TOKENS, HIDDEN), torch.ones(2, TOKENS, dtype=torch.long)
    mask[1, TOKENS // 2:] = 0  # the second item is half padding
    got = pool(hidden, mask, (how,))
    assert_matches(got, pool(hidden.float(), mask, (how,)))
    assert_matches(F.normalize(got, dim=1), F.normalize(pool(hidden.float(), mask, (how,)), dim=1))
    if how in ("mean", "weightedmean"):
        assert float(got.min()) > 8.5 and float(got.max()) < 9.5


@pytest.mark.parametrize("strategy", ["max", "sum"])
def test_sparse_splade_pooling(strategy: str) -> None:
    logits, mask = near_nine(1, TOKENS, 16), torch.ones(1, TOKENS, dtype=torch.long)
    got = splade_pool(logits.clone(), mask, strategy)  # log1p(relu) stays in the logits' dtype: they are the big tensor
    assert_matches(got, splade_pool(logits.float(), mask, strategy), rtol=2e-3)


@torch.inference_mode()
def test_hybrid_dense_sparse_and_colbert_heads() -> None:
    hidden, mask = near_nine(1, TOKENS, HIDDEN), torch.ones(1, TOKENS, dtype=torch.long)
    ids = torch.randint(5, 100, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, 1)
    colbert = torch.nn.Linear(HIDDEN, 32)
    assert_matches(dense_vectors(hidden, normalize=True), dense_vectors(hidden.float(), normalize=True))
    assert_matches(sparse_weights(hidden, ids, mask, head.half(), 100, [0, 1, 2]),
                   sparse_weights(hidden.float(), ids, mask, head.float(), 100, [0, 1, 2]), rtol=2e-3)
    got = colbert_vectors(hidden, mask, colbert.half(), normalize=True)
    want = colbert_vectors(hidden.float(), mask, colbert.float(), normalize=True)
    assert all(g.dtype == "float32" and abs(g - w).max() < 2e-3 for g, w in zip(got, want, strict=True))


def test_multivector_projection_normalises_in_float32() -> None:
    hidden = near_nine(1, TOKENS, HIDDEN) * 4  # rows whose squares sum to about 83 000: inf in fp16
    projection = Projection(torch.eye(HIDDEN).half())
    got = project(hidden, projection, normalize=True)
    assert_matches(got, F.normalize(hidden.float(), dim=-1))


def test_clip_image_pooling_and_normalisation() -> None:
    vectors = (near_nine(3, 1024) * 4).numpy()
    got = torch.from_numpy(pool_images(vectors, [2, 1], normalize=True))
    want = torch.from_numpy(pool_images(vectors.astype("float32"), [2, 1], normalize=True))
    assert_matches(got, want)
    assert torch.linalg.vector_norm(got, dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_cross_encoder_scores_are_float32() -> None:
    logits = near_nine(4, 1)
    scores, raw = scores_from_logits(logits, torch.sigmoid)
    assert scores.dtype == raw.dtype == torch.float32 and torch.isfinite(scores).all()

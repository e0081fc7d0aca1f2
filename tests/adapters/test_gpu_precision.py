"""GPU precision defaults, checked on the CPU: what a CUDA worker computes in when nothing names a precision, TF32 for
what stays float32, and a stand-in harness that runs the CUDA default on the CPU (fp16 mapped to bf16, which the CPU
computes) through the real dense adapter, with pooling and normalisation in float32."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sie_worker import cuda
from sie_worker.protocol import WorkerSpec
from tests.adapters.conftest import MakeAdapter, encode
from tests.precision import TOLERANCES
from tests.tiny_models import build_dense_st


def spec(folder: Path | str = "", *, adapter: str = "dense", device: str = "cuda:0",
         precision: str | None = None) -> WorkerSpec:
    return WorkerSpec(worker_id="w", model="m", adapter=adapter, weights_dir=str(folder), to_worker_endpoint="",
                      from_worker_endpoint="", device=device, compute_precision=precision)


def checkpoint(tmp_path: Path, **config: str) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(("config", "adapter", "bf16", "want"), [
    ({"model_type": "bert", "dtype": "float32"}, "dense", True, "float16"),  # BERT-like: fp16, as TEI and Infinity
    ({"model_type": "xlm-roberta"}, "hybrid", False, "float16"),
    ({"model_type": "deberta-v2"}, "classifier", True, "bfloat16"),  # fp16 overflows DeBERTa-v2/v3
    ({"model_type": "deberta-v2"}, "classifier", False, "float32"),  # ... and before Ampere it stays float32
    ({"model_type": "bert"}, "gliner", True, "bfloat16"),  # GLiNER's backbones are DeBERTa-v3
    ({"model_type": "qwen2", "torch_dtype": "bfloat16"}, "dense", True, "bfloat16"),  # saved (trained) in bf16
    ({}, "dense", True, "float16"),
], ids=["bert", "xlm-r", "deberta", "deberta-no-bf16", "gliner", "bf16-checkpoint", "no-config"])
def test_a_cuda_worker_with_no_precision_named_gets_its_family_default(
        tmp_path: Path, config: dict[str, str], adapter: str, bf16: bool, want: str) -> None:
    assert cuda.default_precision(spec(checkpoint(tmp_path, **config), adapter=adapter), bf16) == want


def test_a_named_precision_wins_and_the_cpu_default_stays_float32(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path, model_type="deberta-v2")
    # --dtype float32 (global) or a bundle's compute_precision reach the spec; either is kept as is.
    assert cuda.default_precision(spec(folder, precision="float32"), bf16_supported=True) == "float32"
    assert cuda.default_precision(spec(folder, precision="float16"), bf16_supported=True) == "float16"
    assert cuda.default_precision(spec(folder, device="cpu"), bf16_supported=True) is None
    assert cuda.default_precision(spec(device="cuda:0"), bf16_supported=True) == "float16"  # package-backed: no folder


@pytest.fixture
def matmul_precision() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_tf32_is_on_for_the_float32_matmuls_and_convolutions_left(matmul_precision: None) -> None:
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    cuda.enable_tf32()
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"


def cpu_stand_in(gpu_spec: WorkerSpec) -> str:
    """The precision a CUDA worker would run, as the CPU can run it: fp16 becomes bf16 (same width, and CPU fp16
    kernels are float32 in disguise); bf16 and float32 stay."""
    chosen = cuda.default_precision(gpu_spec, bf16_supported=True) or "float32"
    return "bfloat16" if chosen == "float16" else chosen


def test_the_cuda_default_runs_the_model_in_half_precision_and_pools_in_float32(
        tmp_path: Path, make_adapter: MakeAdapter) -> None:
    folder = build_dense_st(tmp_path / "dense")
    precision = cpu_stand_in(spec(folder))
    assert precision == "bfloat16"
    texts = ["a short one", "a rather longer sentence about GPUs and their precision", "x"]
    half = make_adapter("dense", folder, compute_precision=precision)
    assert next(half.model.parameters()).dtype == torch.bfloat16  # type: ignore[attr-defined]
    served = encode(half, texts, ["dense"]).dense
    reference = encode(make_adapter("dense", folder, compute_precision="float32"), texts, ["dense"]).dense
    assert served is not None and reference is not None
    got, want = served.numpy(), reference.numpy()
    assert got.dtype == np.float32  # pooled and normalised in float32 whatever the model computed in
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    cosine = (got * want).sum(axis=1)
    assert cosine.min() >= TOLERANCES["bfloat16"].min_cosine, cosine

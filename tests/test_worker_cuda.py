"""The worker's CUDA handling on a CPU-only torch: which errors end a worker, and where a GPU placement goes."""

from __future__ import annotations

import logging

import pytest
import torch

from sie_worker import cuda
from sie_worker.adapters.fake import AcceleratorError as FakeAcceleratorError
from sie_worker.adapters.fake import InjectedOutOfMemory
from sie_worker.failures import batch_failure_code as _failure_code
from sie_worker.failures import load_error_class
from sie_worker.protocol import LoadErrorClass, WorkerSpec


@pytest.mark.parametrize("exc", [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, ...)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    FakeAcceleratorError("CUDA error: an illegal memory access was encountered (injected)"),
], ids=["accelerator-error", "device-assert", "cublas", "cudnn", "fake-adapter"])
def test_a_cuda_error_that_is_not_an_oom_is_a_device_fault(exc: BaseException) -> None:
    assert cuda.is_device_fault(exc) and not cuda.is_out_of_memory(exc)
    assert _failure_code(exc) == "INFERENCE_ERROR"


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB"),
    torch.AcceleratorError("CUDA error: out of memory"),
    InjectedOutOfMemory("CUDA out of memory (injected by the fake adapter)"),
], ids=["typed-oom", "oom-as-cuda-error", "fake-adapter"])
def test_an_out_of_memory_is_not_a_fault_and_maps_to_resource_exhausted(exc: BaseException) -> None:
    assert cuda.is_out_of_memory(exc) and not cuda.is_device_fault(exc)
    assert _failure_code(exc) == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("exc", [RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"),
                                 ValueError("CUDA error: in a ValueError is no CUDA error"), KeyError("x")])
def test_ordinary_errors_are_neither(exc: BaseException) -> None:
    assert not cuda.is_device_fault(exc) and not cuda.is_out_of_memory(exc)


def spec(device: str, cpu_fallback: bool) -> WorkerSpec:
    return WorkerSpec(worker_id="w", model="m", adapter="dense", weights_dir="", to_worker_endpoint="",
                      from_worker_endpoint="", device=device, cpu_fallback=cpu_fallback,
                      env={"CUDA_VISIBLE_DEVICES": "GPU-5e3a8c1f-2b6d-4e9a-8f70-1c2d3e4f5a6b"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_device_auto_moves_a_worker_whose_torch_has_no_cuda_to_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    placed = spec("cuda:0", cpu_fallback=True)
    with caplog.at_level(logging.WARNING, logger="sie.worker"):
        assert cuda.prepare_device(placed) == 0
    assert placed.device == "cpu"
    assert "runs on the CPU instead of cuda:0 (--device auto)" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_device_cuda_with_a_torch_without_cuda_fails_the_load_saying_how_to_fix_it() -> None:
    placed = spec("cuda:0", cpu_fallback=False)
    with pytest.raises(cuda.TorchWithoutCuda, match=r"has no usable CUDA .*SIE_TORCH=cuda make install") as caught:
        cuda.prepare_device(placed)
    assert placed.device == "cuda:0"
    assert load_error_class(caught.value) is LoadErrorClass.DEPENDENCY  # permanent: a retry cannot install torch


def test_a_cpu_worker_never_touches_cuda() -> None:
    assert cuda.prepare_device(spec("cpu", cpu_fallback=False)) == 0

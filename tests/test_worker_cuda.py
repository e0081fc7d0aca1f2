"""The worker's CUDA handling on a CPU-only torch: which errors end a worker, and where a GPU placement goes."""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any

import pytest
import torch

from sie_sdk.codes import ErrorCode
from sie_worker import cuda
from sie_worker.adapters.base import OutOfMemory, Prepared
from sie_worker.adapters.fake import AcceleratorError as FakeAcceleratorError
from sie_worker.adapters.fake import InjectedOutOfMemory
from sie_worker.failures import batch_failure_code as _failure_code
from sie_worker.failures import load_error_class
from sie_worker.loop import Worker
from sie_worker.options import GPU_MAX_BATCH_TOKENS, MAX_BATCH_TOKENS
from sie_worker.protocol import BatchDone, BatchFailed, EncodeBatch, EncodeResult, InputItem, LoadErrorClass, WorkerSpec


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
    placed.max_batch_tokens = GPU_MAX_BATCH_TOKENS  # the router sized it for the GPU it placed the worker on
    with caplog.at_level(logging.WARNING, logger="sie.worker"):
        assert cuda.prepare_device(placed) is None
    assert placed.device == "cpu" and placed.max_batch_tokens == MAX_BATCH_TOKENS
    assert placed.compute_precision is None  # the CPU's float32, not the GPU's default
    assert "runs on the CPU instead of cuda:0 (--device auto)" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_device_cuda_with_a_torch_without_cuda_fails_the_load_saying_how_to_fix_it() -> None:
    placed = spec("cuda:0", cpu_fallback=False)
    with pytest.raises(cuda.TorchWithoutCuda, match=r"has no usable CUDA .*SIE_TORCH=cuda make install") as caught:
        cuda.prepare_device(placed)
    assert placed.device == "cuda:0"
    assert load_error_class(caught.value) is LoadErrorClass.DEPENDENCY  # permanent: a retry cannot install torch


def test_a_cpu_worker_never_touches_cuda() -> None:
    assert cuda.prepare_device(spec("cpu", cpu_fallback=False)) is None


def test_the_context_is_measured_after_the_warm_up_from_nvml_at_both_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML before CUDA starts, NVML again once load() has warmed up (cuBLAS and the lazily loaded kernels exist then),
    less torch's own reserved memory; never cudaMemGetInfo, which counts the same memory differently."""
    MiB = 2**20
    readings = iter([70_000 * MiB])
    monkeypatch.setattr(cuda, "_nvml_free", lambda _uuid: next(readings))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *_: 300 * MiB)

    def mixed(*_: Any) -> None:
        raise AssertionError("the context figure must not mix cudaMemGetInfo with NVML")

    monkeypatch.setattr(torch.cuda, "mem_get_info", mixed)
    placed = spec("cuda:0", cpu_fallback=False)
    assert cuda.context_bytes(placed, 80_000 * MiB) == 10_000 * MiB - 300 * MiB
    assert cuda.context_bytes(placed, None) == 0  # NVML could not read the GPU before: nothing to compare
    assert cuda.context_bytes(spec("cpu", cpu_fallback=False), 80_000 * MiB) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_a_batch_reports_no_cuda_memory_where_cuda_is_not_in_use() -> None:
    assert cuda.memory_figures() == (0, 0)


class _Activations:
    """Stands in for the tensors a failed forward's frames hold."""


def _batch() -> Prepared:
    return Prepared(batch=EncodeBatch(batch_id=7, items=[InputItem(text="x")], output_types=["dense"]))


def test_after_an_oom_the_cache_is_emptied_outside_the_except_block_once_the_batch_is_freed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[weakref.ref[_Activations]] = []

    class OutOfMemoryAdapter:
        def forward(self, prepared: Prepared) -> EncodeResult:
            activations = _Activations()
            held.append(weakref.ref(activations))
            raise OutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB")

    seen: list[tuple[Any, Any]] = []
    monkeypatch.setattr(cuda, "release_cached_memory", lambda: seen.append((sys.exc_info()[0], held[0]())))
    # pytest's log capture keeps each record, its traceback included; a server's handlers format and drop it.
    monkeypatch.setattr(logging.getLogger("sie.worker"), "disabled", True)
    worker = Worker.__new__(Worker)
    worker.device_fault = None
    reply = worker.run_one(OutOfMemoryAdapter(), _batch())  # type: ignore[arg-type]
    assert isinstance(reply, BatchFailed) and reply.code is ErrorCode.RESOURCE_EXHAUSTED  # the router splits it
    # Emptied once, with no exception in flight and the failed forward's objects already gone.
    assert seen == [(None, None)]


def test_a_done_batch_carries_the_allocators_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    class Adapter:
        def forward(self, prepared: Prepared) -> EncodeResult:
            return EncodeResult(token_counts=[1])

    monkeypatch.setattr(cuda, "memory_figures", lambda: (600 * 2**20, 900 * 2**20))
    worker = Worker.__new__(Worker)
    worker.device_fault = None
    reply = worker.run_one(Adapter(), _batch())  # type: ignore[arg-type]
    assert isinstance(reply, BatchDone)
    assert (reply.memory_allocated, reply.memory_reserved) == (600 * 2**20, 900 * 2**20)

"""The worker's CUDA device (worker process): start it, measure its context, and tell errors it survives from ones
it does not. torch is imported only by the functions that need it, so the fake adapter's workers never load it.

A CUDA error that is not an out-of-memory (an illegal address, a device-side assert) leaves the context broken: every
later call fails too. The worker then exits non-zero so that its supervisor restarts it and counts the crash.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from sie_worker.failures import is_out_of_memory
from sie_worker.protocol import WorkerSpec

log = logging.getLogger("sie.worker")

# Exit status of a worker whose CUDA context broke (any non-zero status is a crash to the router).
EXIT_DEVICE_FAULT = 4
_FAULT_MARKERS = ("CUDA error", "CUBLAS_STATUS_", "cuDNN error", "CUDNN_STATUS_", "device-side assert")


class TorchWithoutCuda(ImportError):
    """A CPU build of torch on a GPU placement: a missing dependency (permanent), not an engine fault to retry."""


def _type_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA error that is not an out-of-memory: torch raises `torch.AcceleratorError` (a RuntimeError) for them, and
    older paths a plain RuntimeError whose message starts "CUDA error" (cuBLAS and cuDNN name their own status)."""
    if is_out_of_memory(exc) or not isinstance(exc, RuntimeError):
        return False
    return "AcceleratorError" in _type_names(exc) or any(marker in str(exc) for marker in _FAULT_MARKERS)


def release_cached_memory() -> None:
    """After an out-of-memory: hand the allocator's cached blocks back, so the next batch (and other workers on the
    GPU) start from what is really in use."""
    torch: Any = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def prepare_device(spec: WorkerSpec) -> int:
    """Start CUDA for a GPU worker before its model loads; returns the bytes its context took (0 on the CPU).

    A torch without CUDA on a GPU placement fails the load, unless `cpu_fallback` (--device auto) moves the worker to
    the CPU, with a warning."""
    if not spec.device.startswith("cuda"):
        return 0
    import torch

    if not torch.cuda.is_available():
        if not spec.cpu_fallback:
            raise TorchWithoutCuda(f"this worker was placed on {spec.device}, but its torch {torch.__version__} has no "
                               "usable CUDA (a CPU build? reinstall with SIE_TORCH=cuda make install)")
        log.warning("torch %s has no usable CUDA here; %s runs on the CPU instead of %s (--device auto)",
                    torch.__version__, spec.model, spec.device)
        spec.device = "cpu"
        return 0
    before = _nvml_free(spec.env.get("CUDA_VISIBLE_DEVICES", ""))
    torch.zeros(1, device="cuda:0")  # creates the context
    torch.cuda.synchronize()
    free_after, _total = torch.cuda.mem_get_info()
    if before is None:
        return 0
    return max(0, before - int(free_after) - int(torch.cuda.memory_reserved()))


def _nvml_free(uuid: str) -> int | None:
    """Free memory on the worker's GPU as NVML sees it before this process touches CUDA; None if NVML cannot say."""
    import pynvml

    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByUUID(uuid)).free)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        log.warning("cannot measure the CUDA context (NVML: %s); the router will count only torch's memory", exc)
        return None


def synchronize(device: Any) -> None:
    """Wait for the device, so an asynchronous CUDA error surfaces here (at load) rather than in a later batch."""
    if getattr(device, "type", "") == "cuda":
        import torch

        torch.cuda.synchronize(device)

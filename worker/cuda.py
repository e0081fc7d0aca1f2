"""The worker's CUDA device (worker process): start it, pick its default precision, measure its context, and tell
errors it survives from ones it does not. torch is imported only by the functions that need it, so the fake adapter's
workers never load it.

A CUDA error that is not an out-of-memory (an illegal address, a device-side assert) leaves the context broken: every
later call fails too. The worker then exits non-zero so that its supervisor restarts it and counts the crash.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from sie_worker.adapters.batching import read_json
from sie_worker.failures import is_out_of_memory
from sie_worker.options import CPU_WORKER_ENV, MAX_BATCH_TOKENS
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


# Default precision on a GPU, where neither the model's bundle (`compute_precision`) nor --dtype names one. fp16 for
# BERT-like encoders, as TEI and Infinity run them. bf16 where fp16 overflows: DeBERTa-v2/v3's attention scores (the
# zero-shot classifiers; GLiNER's backbones are DeBERTa-v3), and checkpoints saved in bf16 (decoder-based embedders,
# trained in it). Without bf16 on the GPU (before Ampere) those stay float32. Pooling and normalisation run in float32
# whatever the model computes in (each adapter casts before them).
FP16_OVERFLOWS = frozenset({"deberta-v2"})  # transformers' model_type of DeBERTa-v2 and -v3
BF16_FAMILIES = frozenset({"gliner"})


def default_precision(spec: WorkerSpec, bf16_supported: bool) -> str | None:
    """The precision a worker computes in: the spec's own when it names one, None (float32) on the CPU, else the GPU
    default above, read from the checkpoint's config.json."""
    if spec.compute_precision is not None or not spec.device.startswith("cuda"):
        return spec.compute_precision
    config = read_json(Path(spec.weights_dir) / "config.json") if spec.weights_dir else None
    config = config if isinstance(config, dict) else {}
    saved = config.get("torch_dtype") or config.get("dtype")
    if spec.adapter in BF16_FAMILIES or config.get("model_type") in FP16_OVERFLOWS or saved == "bfloat16":
        return "bfloat16" if bf16_supported else "float32"
    return "float16"


def enable_tf32() -> None:
    """TF32 tensor cores for the float32 matmuls and convolutions left (a model run in float32 by choice, heads kept in
    float32): 10 mantissa bits in the products, float32 accumulation, several times the float32 rate on Ampere+."""
    import torch

    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def release_cached_memory() -> None:
    """After an out-of-memory: hand the allocator's cached blocks back, so the next batch (and other workers on the
    GPU) start from what is really in use."""
    torch: Any = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def prepare_device(spec: WorkerSpec) -> int | None:
    """Start CUDA for a GPU worker before its model loads, with TF32 on and its default precision in the spec; returns
    the GPU's free memory as NVML saw it before this process touched CUDA (None on the CPU, or if NVML cannot say),
    for `context_bytes` once the model is loaded and warmed up.

    A torch without CUDA on a GPU placement fails the load, unless `cpu_fallback` (--device auto) moves the worker to
    the CPU, with a warning."""
    if not spec.device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        if not spec.cpu_fallback:
            raise TorchWithoutCuda(f"this worker was placed on {spec.device}, but its torch {torch.__version__} has no "
                               "usable CUDA (a CPU build? reinstall with SIE_TORCH=cuda make install)")
        log.warning("torch %s has no usable CUDA here; %s runs on the CPU instead of %s (--device auto)",
                    torch.__version__, spec.model, spec.device)
        spec.device = "cpu"
        for name, value in CPU_WORKER_ENV.items():  # before any tokenizer runs; launched for a GPU, it lacks them
            os.environ.setdefault(name, value)
        spec.max_batch_tokens = min(spec.max_batch_tokens, MAX_BATCH_TOKENS)  # the CPU's budget, not the GPU's
        return None
    before = _nvml_free(spec.env.get("CUDA_VISIBLE_DEVICES", ""))
    torch.zeros(1, device="cuda:0")  # creates the context
    enable_tf32()
    spec.compute_precision = default_precision(spec, torch.cuda.is_bf16_supported())
    log.info("%s computes in %s on %s", spec.model, spec.compute_precision, spec.device)
    return before


def context_bytes(spec: WorkerSpec, free_before: int | None) -> int:
    """Device memory this worker holds beyond torch's allocator: its CUDA context, cuBLAS's handle and workspaces, and
    the kernels loaded lazily by the warm-up. Measured after load() (whose warm-up runs every kernel a batch runs),
    from NVML both times: cudaMemGetInfo counts the same memory differently (it excludes what the driver reserves).
    The router starts one worker per GPU at a time, so no neighbour's allocations fall into the difference.
    0 on the CPU or when NVML could not read the GPU before."""
    if free_before is None or not spec.device.startswith("cuda"):
        return 0
    import torch

    torch.cuda.synchronize()
    free_after = _nvml_free(spec.env.get("CUDA_VISIBLE_DEVICES", ""))
    if free_after is None:
        return 0
    return max(0, free_before - free_after - int(torch.cuda.memory_reserved()))


def memory_figures() -> tuple[int, int]:
    """(allocated, reserved) bytes of torch's CUDA allocator now, for `BatchDone`; (0, 0) where CUDA is not in use."""
    torch: Any = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0, 0
    return int(torch.cuda.memory_allocated()), int(torch.cuda.memory_reserved())


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

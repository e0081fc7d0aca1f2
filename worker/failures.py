"""How the worker names a failure (worker process): a batch's exception becomes a shared `ErrorCode`, a load's a
`LoadErrorClass`; both by exception type, never by matching message text."""

from __future__ import annotations

import sys

from sie_sdk.codes import ErrorCode
from sie_worker.adapters.base import BadInput, BadModelConfig, InputTooLong, OutOfMemory, UnknownFamily, UnsupportedTask
from sie_worker.protocol import LoadErrorClass


def _is_ort_allocation_failure(exc: BaseException) -> bool:
    # ONNX Runtime has no OOM type of its own: its arena raises its RuntimeException saying it failed to allocate.
    return type(exc).__module__.startswith("onnxruntime") and "Failed to allocate memory" in str(exc)


def _is_cuda_allocation_failure(exc: BaseException) -> bool:
    # cuBLAS workspaces and kernel launches that cannot allocate raise torch.AcceleratorError("CUDA error: out of
    # memory"), not OutOfMemoryError; the context survives it, so it is an OOM to split, not a fault to exit on.
    return type(exc).__name__ == "AcceleratorError" and "CUDA error: out of memory" in str(exc)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, OutOfMemory)) or _is_ort_allocation_failure(exc) or \
            _is_cuda_allocation_failure(exc):
        return True
    if "torch" in sys.modules:  # only a torch adapter raises torch's OOM; the fake adapter never pays for the import
        from sie_worker.adapters.torch_common import is_out_of_memory as torch_out_of_memory

        return torch_out_of_memory(exc)
    return False


def batch_failure_code(exc: BaseException) -> ErrorCode:
    if isinstance(exc, InputTooLong):
        return ErrorCode.INPUT_TOO_LONG
    if isinstance(exc, (BadInput, UnsupportedTask)):
        return ErrorCode.INVALID_INPUT
    if is_out_of_memory(exc):
        return ErrorCode.RESOURCE_EXHAUSTED  # the router splits the batch and tries again before answering this
    return ErrorCode.INFERENCE_ERROR


def load_error_class(exc: BaseException) -> LoadErrorClass:
    """Permanent classes (NOT_FOUND, CONFIG, DEPENDENCY) wait for an operator; the rest retry after a cooldown."""
    if is_out_of_memory(exc):
        return LoadErrorClass.OOM
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return LoadErrorClass.NOT_FOUND
    if isinstance(exc, ImportError):
        return LoadErrorClass.DEPENDENCY
    if isinstance(exc, (BadModelConfig, UnknownFamily, ValueError)):
        return LoadErrorClass.CONFIG
    if isinstance(exc, OSError):
        # With an errno it is the system refusing for now (EMFILE, ENOMEM, EIO); without one it is how transformers
        # and huggingface_hub say a file the model needs is missing.
        return LoadErrorClass.STORAGE if exc.errno is not None else LoadErrorClass.NOT_FOUND
    return LoadErrorClass.ENGINE

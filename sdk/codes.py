"""The error codes every SIE process speaks (SDK, router and worker): one enum, so msgspec validates them on decode.

Imports only the standard library, so the worker protocol and the SDK can both use it without torch.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """A machine-readable failure code, as the native API's `detail.code` and `X-SIE-Error-Code` carry it."""

    INVALID_INPUT = "INVALID_INPUT"
    INPUT_TOO_LONG = "INPUT_TOO_LONG"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_EXISTS = "MODEL_EXISTS"  # a model added at runtime under a name already served (or another pool's)
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    MODEL_NOT_SUPPORTED = "MODEL_NOT_SUPPORTED"
    INVALID_DIMENSIONS = "INVALID_DIMENSIONS"
    INVALID_TOKEN_IDS = "INVALID_TOKEN_IDS"
    INVALID_MEDIA = "INVALID_MEDIA"
    MODEL_LOADING = "MODEL_LOADING"  # retryable: a cold load, or a worker that died or hung and is restarting
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"  # terminal: never retried by clients
    QUEUE_FULL = "QUEUE_FULL"  # retryable
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # retryable: out of device memory even after splitting the batch
    SHUTTING_DOWN = "SHUTTING_DOWN"
    POOL_UNAVAILABLE = "POOL_UNAVAILABLE"
    INFERENCE_ERROR = "INFERENCE_ERROR"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL_ERROR = "INTERNAL_ERROR"  # anything the server did not foresee, a worker's unreadable reply included


class ClientCode(StrEnum):
    """Codes the SDK raises itself, about an answer it could not use; no server sends them."""

    ENCODE_RESULT_COUNT_MISMATCH = "ENCODE_RESULT_COUNT_MISMATCH"  # fewer or more results than items sent

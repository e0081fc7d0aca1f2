"""Client-side exceptions, one per server error code (the server's table is `sie_router.errors`)."""

from __future__ import annotations

from typing import Any

from sie_sdk.codes import ErrorCode


class SIEError(Exception):
    """Base of every SDK error; carries the server's code and HTTP status when there was a response."""

    def __init__(self, message: str, *, code: str | None = None, status_code: int | None = None,
                 param: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status_code = status_code
        self.param = param
        self.details = details or {}


class RequestError(SIEError):
    """The request was refused (4xx): fix the request, retrying will not help."""


class InputTooLongError(RequestError):
    """An input exceeds a size limit."""


class ServerError(SIEError):
    """The server failed (5xx) in a way that retrying did not or cannot fix."""


class ModelLoadingError(ServerError):
    """The model was still loading when the retry budget ran out."""


class ModelLoadFailedError(ServerError):
    """The model cannot load (terminal): missing weights, bad config, or a passing failure within its cooldown."""


class QueueFullError(ServerError):
    """The model's queue stayed full for the whole retry budget."""


class ResourceExhaustedError(ServerError):
    """The device stayed out of memory for the whole retry budget."""


# Which exception a final (non-retried or retry-exhausted) error becomes, by server code.
# Keyed by the shared enum; a code from a newer server that the enum lacks falls back on the status (StrEnum members
# hash as their strings, so a plain string from a response finds its entry).
EXCEPTION_BY_CODE: dict[str, type[SIEError]] = {
    ErrorCode.INPUT_TOO_LONG: InputTooLongError,
    ErrorCode.MODEL_LOADING: ModelLoadingError,
    ErrorCode.MODEL_LOAD_FAILED: ModelLoadFailedError,
    ErrorCode.QUEUE_FULL: QueueFullError,
    ErrorCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
}

# Codes that a 503 may carry and that the client retries, honouring Retry-After.
RETRYABLE_CODES: frozenset[str] = frozenset({ErrorCode.MODEL_LOADING, ErrorCode.QUEUE_FULL,
                                             ErrorCode.RESOURCE_EXHAUSTED})


def error_from_response(status: int, code: str | None, message: str, param: str | None = None,
                        details: dict[str, Any] | None = None) -> SIEError:
    """Build the exception for a final error response."""
    cls = EXCEPTION_BY_CODE.get(code or "")
    if cls is None:
        cls = RequestError if status < 500 else ServerError
    return cls(message, code=code, status_code=status, param=param, details=details)

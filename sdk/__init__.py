"""SIE Python SDK: a small sync client for the native API (`encode`, `score`, `extract`)."""

from __future__ import annotations

from sie_sdk.client import SIEClient
from sie_sdk.codes import ErrorCode
from sie_sdk.errors import (
    InputTooLongError,
    ModelLoadFailedError,
    ModelLoadingError,
    QueueFullError,
    RequestError,
    ResourceExhaustedError,
    ServerError,
    SIEError,
)

__all__ = [
    "ErrorCode",
    "InputTooLongError",
    "ModelLoadFailedError",
    "ModelLoadingError",
    "QueueFullError",
    "RequestError",
    "ResourceExhaustedError",
    "SIEClient",
    "SIEError",
    "ServerError",
]

__version__ = "0.1.0"

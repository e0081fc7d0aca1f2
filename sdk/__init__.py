"""SIE Python SDK: a small sync client for the native API (`encode`, `score`, `extract`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from sie_sdk.client import SIEClient


def __getattr__(name: str) -> Any:
    # The client (and httpx, 0.33 s and ~15 MiB to import) loads on first use: the router and every worker import
    # sie_sdk.codes, which imports this package first.
    if name == "SIEClient":
        from sie_sdk.client import SIEClient

        return SIEClient
    raise AttributeError(f"module 'sie_sdk' has no attribute {name!r}")

"""The one error table (router process): every failure is an `SIEError` with a code; one renderer per API.

Handlers raise; `render_error` turns the error into the envelope of the API the request came through:
native `{"detail": {...}}`, OpenAI `{"error": {...}}`, Infinity's `{"error": {..., "code": <int>}}`, or TEI's
`{"error", "error_type"}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgspec
from starlette.responses import Response

from sie_sdk.codes import ErrorCode
from sie_worker.protocol import LoadErrorClass


class Api(Enum):
    """Which envelope an error is rendered in, chosen by the route."""

    NATIVE = "native"
    OPENAI = "openai"
    INFINITY = "infinity"
    TEI = "tei"


@dataclass(frozen=True)
class Code:
    """How one error code is answered: native status, Retry-After, and the OpenAI-route status and code."""

    status: int
    retry_after: float | None
    openai_status: int
    openai_code: str
    native_code: str | None = None  # the code the native API shows, where it differs from ours


# code -> how it is answered. Retryable answers carry Retry-After; terminal 5xx tell OpenAI clients not to retry.
TABLE: dict[ErrorCode, Code] = {
    ErrorCode.INVALID_INPUT: Code(400, None, 400, "invalid_request"),
    ErrorCode.INPUT_TOO_LONG: Code(400, None, 400, "input_too_long"),
    ErrorCode.REQUEST_TOO_LARGE: Code(413, None, 413, "request_too_large", native_code=ErrorCode.INPUT_TOO_LONG),
    ErrorCode.UNAUTHORIZED: Code(401, None, 401, "invalid_api_key"),
    ErrorCode.FORBIDDEN: Code(403, None, 403, "forbidden"),
    ErrorCode.MODEL_NOT_FOUND: Code(404, None, 404, "model_not_found"),
    ErrorCode.MODEL_EXISTS: Code(409, None, 409, "model_exists"),
    ErrorCode.NOT_FOUND: Code(404, None, 404, "not_found"),
    ErrorCode.METHOD_NOT_ALLOWED: Code(405, None, 405, "method_not_allowed"),
    ErrorCode.MODEL_NOT_SUPPORTED: Code(400, None, 400, "model_not_supported"),
    ErrorCode.INVALID_DIMENSIONS: Code(400, None, 400, "invalid_dimensions"),
    ErrorCode.INVALID_TOKEN_IDS: Code(400, None, 400, "invalid_token_ids"),
    # Media that cannot be used (undecodable, a refused URL): INVALID_INPUT natively, Infinity's 400 handler error.
    ErrorCode.INVALID_MEDIA: Code(400, None, 400, "invalid_media", native_code=ErrorCode.INVALID_INPUT),
    ErrorCode.MODEL_LOADING: Code(503, 5.0, 503, "model_loading"),
    ErrorCode.MODEL_LOAD_FAILED: Code(502, None, 502, "model_load_failed"),
    ErrorCode.QUEUE_FULL: Code(503, 1.0, 429, "server_overloaded"),
    ErrorCode.RESOURCE_EXHAUSTED: Code(503, 5.0, 503, "resource_exhausted"),
    ErrorCode.SHUTTING_DOWN: Code(503, 5.0, 503, "shutting_down"),
    # The pool serving the model has no pod answering yet (scaling from zero): SDK clients retry MODEL_LOADING.
    ErrorCode.POOL_UNAVAILABLE: Code(503, 5.0, 503, "pool_unavailable", native_code=ErrorCode.MODEL_LOADING),
    ErrorCode.INFERENCE_ERROR: Code(500, None, 500, "inference_error"),
    ErrorCode.DEADLINE_EXCEEDED: Code(504, None, 504, "deadline_exceeded"),
    ErrorCode.INTERNAL_ERROR: Code(500, None, 500, "internal_error"),
}


class SIEError(Exception):
    """A failure with a code from `TABLE`; `param` names the offending field, `extra` adds body keys, `retry_after`
    (seconds) replaces the code's Retry-After where the server knows better (the back-off left)."""

    def __init__(self, code: ErrorCode, message: str, *, param: str | None = None, retry_after: float | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)  # a code outside the enum is a bug in the router: ValueError at once
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.extra = extra

    @property
    def entry(self) -> Code:
        return TABLE[self.code]


class LoadError(SIEError):
    """A model that could not load: 502 `MODEL_LOAD_FAILED` (no Retry-After), with why and whether it will retry."""

    def __init__(self, error_class: LoadErrorClass, message: str, *, attempts: int = 1) -> None:
        super().__init__(ErrorCode.MODEL_LOAD_FAILED, message, error_class=str(error_class),
                         permanent=error_class.permanent, attempts=attempts)
        self.error_class = error_class
        self.attempts = attempts

    @property
    def permanent(self) -> bool:
        return self.error_class.permanent

    def again(self, attempts: int) -> LoadError:
        """The same failure, counted as the `attempts`-th in a row."""
        return LoadError(self.error_class, self.message, attempts=attempts)

    def summary(self) -> dict[str, Any]:
        """`last_error` as `/v1/models` and the admin listing show it (sie-native.md, section 9)."""
        return {"code": str(self.error_class), "message": self.message, "attempts": self.attempts,
                "permanent": self.permanent}


def invalid(message: str, param: str | None = None) -> SIEError:
    return SIEError(ErrorCode.INVALID_INPUT, message, param=param)


def _json(body: Any, status: int, headers: dict[str, str]) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, headers=headers, media_type="application/json")


# TEI 1.9.3's error type and status for each of our codes (its `ErrorType`): every code has a row (checked below);
# failures TEI would meet in its backend are `Backend` 424, as TEI answers an inference failure. `error_type` in an
# error's extras (TEI's `Empty`, 400) overrides the table. Codes in TEI_BARE are answered as TEI's axum layers do:
# no envelope, an empty or plain-text body.
TEI_TYPES: dict[ErrorCode, tuple[str, int]] = {
    ErrorCode.INVALID_INPUT: ("Validation", 422), ErrorCode.INPUT_TOO_LONG: ("Validation", 422),
    ErrorCode.INVALID_DIMENSIONS: ("Validation", 422), ErrorCode.INVALID_TOKEN_IDS: ("Validation", 422),
    ErrorCode.INVALID_MEDIA: ("Validation", 422), ErrorCode.MODEL_NOT_SUPPORTED: ("Backend", 424),
    ErrorCode.QUEUE_FULL: ("Overloaded", 429), ErrorCode.RESOURCE_EXHAUSTED: ("Overloaded", 429),
    ErrorCode.MODEL_NOT_FOUND: ("NotFound", 404), ErrorCode.MODEL_EXISTS: ("Validation", 422),
    ErrorCode.MODEL_LOADING: ("Unhealthy", 503),
    ErrorCode.SHUTTING_DOWN: ("Unhealthy", 503), ErrorCode.POOL_UNAVAILABLE: ("Unhealthy", 503),
    ErrorCode.FORBIDDEN: ("Backend", 424), ErrorCode.MODEL_LOAD_FAILED: ("Backend", 424),
    ErrorCode.INFERENCE_ERROR: ("Backend", 424), ErrorCode.DEADLINE_EXCEEDED: ("Backend", 424),
    ErrorCode.INTERNAL_ERROR: ("Backend", 424),
}
TEI_BARE: dict[ErrorCode, bytes] = {
    ErrorCode.UNAUTHORIZED: b"", ErrorCode.NOT_FOUND: b"", ErrorCode.METHOD_NOT_ALLOWED: b"",
    ErrorCode.REQUEST_TOO_LARGE: b"Failed to buffer the request body: length limit exceeded",
}


def _render_tei(error: SIEError, headers: dict[str, str]) -> Response:
    if error.code in TEI_BARE:
        return Response(TEI_BARE[error.code], status_code=error.entry.status, headers=headers, media_type="text/plain")
    plain = error.extra.get("plain_status")
    if plain:  # a body that does not fit the schema: axum's plain-text rejection
        return Response(error.message.encode(), status_code=int(plain), headers=headers, media_type="text/plain")
    error_type, status = TEI_TYPES[error.code]
    if "error_type" in error.extra:
        error_type, status = error.extra["error_type"], int(error.extra["status"])
    return _json({"error": error.message, "error_type": error_type}, status, headers)


def _check_tables() -> None:
    # Every code the processes share has an answer in every API: a code without a row would fail only when raised.
    missing = set(ErrorCode) - set(TABLE)
    if missing:
        raise TypeError(f"error codes without a TABLE row: {sorted(missing)}")
    tei_missing, tei_both = set(ErrorCode) - set(TEI_TYPES) - set(TEI_BARE), set(TEI_TYPES) & set(TEI_BARE)
    if tei_missing or tei_both:
        raise TypeError(f"error codes without one TEI answer: {sorted(tei_missing)} have none, {sorted(tei_both)} "
                        "are in both TEI_TYPES and TEI_BARE")


_check_tables()


def render_error(error: SIEError, api: Api) -> Response:
    entry = error.entry
    code = entry.native_code or error.code
    headers: dict[str, str] = {"X-SIE-Error-Code": code}
    if entry.retry_after is not None:
        headers["Retry-After"] = f"{error.retry_after if error.retry_after is not None else entry.retry_after:g}"
    if api is Api.TEI:
        return _render_tei(error, headers)
    if api is Api.NATIVE:
        detail: dict[str, Any] = {"code": code, "message": error.message, **error.extra}
        if error.param:
            detail["param"] = error.param
        return _json({"detail": detail}, entry.status, headers)
    status = entry.openai_status
    if status >= 500 and entry.retry_after is None:
        headers["x-should-retry"] = "false"
    if api is Api.OPENAI:
        kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
        body = {"error": {"message": error.message, "type": kind, "param": error.param, "code": entry.openai_code}}
        return _json(body, status, headers)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
        return _json({"detail": "Unauthorized"}, 401, headers)
    if error.code == ErrorCode.INVALID_INPUT and error.param != "model":
        # Infinity answers schema problems with FastAPI's 422 list; handler errors keep its {"error"} envelope.
        loc = ["body", *(error.param or "").split(".")] if error.param else ["body"]
        detail = [{"type": "value_error", "loc": loc, "msg": error.message, "input": None}]
        return _json({"detail": detail}, 422, headers)
    return _json({"error": {"message": error.message, "type": None, "param": None, "code": status}}, status, headers)


"""Content negotiation and bounded body reading for every route (router process)."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from sie_router.errors import SIEError
from sie_sdk.codes import ErrorCode
from sie_sdk.wire import encode_msgpack, json_hook

T = TypeVar("T")

MSGPACK = "application/msgpack"
_MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes before reading it all; kept on the request, so a
    route that dispatches by body (`/rerank`) and the handler it picks can both read it."""
    cached: bytes | None = getattr(request, "_body", None)
    if cached is not None:
        return cached
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise SIEError(ErrorCode.REQUEST_TOO_LARGE, f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise SIEError(ErrorCode.REQUEST_TOO_LARGE, f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    request._body = b"".join(chunks)
    return request._body


def is_msgpack(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return any(t in content_type for t in _MSGPACK_TYPES)


def wants_msgpack(request: Request) -> bool:
    """msgpack unless the client accepts JSON and not msgpack; no Accept at all means msgpack (the SDK's default)."""
    accept = request.headers.get("accept", "")
    return not ("application/json" in accept and not any(t in accept for t in _MSGPACK_TYPES))


def decode(body: bytes, kind: type[T], *, msgpack: bool) -> T:
    """Decode and validate a body; any failure is a 400 INVALID_INPUT naming the problem."""
    if not body:
        raise SIEError(ErrorCode.INVALID_INPUT, "request body is empty")
    try:
        if msgpack:
            return msgspec.msgpack.decode(body, type=kind)
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise SIEError(ErrorCode.INVALID_INPUT, f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SIEError(ErrorCode.INVALID_INPUT, f"malformed {'msgpack' if msgpack else 'JSON'} body: {exc}") from None


def _float32_json(obj: Any) -> Any:
    """float32 arrays and scalars as float32's shortest decimal that reads back to the same float32, as TEI writes
    them: exact for the values we hold, and about half the digits of their float64 form (a 256 x 384 response: 1.2
    against 2.1 MB, encoded in 2.2 against 4.8 ms, and a client parses it in two thirds of the time). Every other
    value as the SDK's JSON codec writes it."""
    if isinstance(obj, np.ndarray) and obj.dtype == np.float32:
        return msgspec.Raw(orjson.dumps(np.ascontiguousarray(obj), option=orjson.OPT_SERIALIZE_NUMPY))
    if isinstance(obj, np.float32):
        return msgspec.Raw(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY))
    return json_hook(obj)


_json_encoder = msgspec.json.Encoder(enc_hook=_float32_json)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json_encoder.encode(body), status_code=status, headers=headers, media_type="application/json")


def negotiated(request: Request, body: Any, headers: dict[str, str] | None = None) -> Response:
    if wants_msgpack(request):
        return Response(encode_msgpack(body), headers=headers, media_type=MSGPACK)
    return json_response(body, headers=headers)

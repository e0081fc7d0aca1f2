"""Body codecs of the native API: msgpack with msgpack-numpy array maps, and JSON.

Arrays travel as `{b"nd": True, b"type": "<f4", b"kind": b"", b"shape": [...], b"data": <raw bytes>}`, the layout the
upstream SDK decodes. Used by the SDK client and by the router, so both sides agree byte for byte.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

_ND, _TYPE, _KIND, _SHAPE, _DATA = b"nd", b"type", b"kind", b"shape", b"data"
_ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8", "<i2", "<i4", "<i8", "<u2", "<u4", "<u8", "|b1", "|i1", "|u1"})


def _array_map(arr: np.ndarray) -> dict[bytes, Any]:
    arr = np.ascontiguousarray(arr)
    if arr.dtype.str not in _ALLOWED_DTYPES:
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return {_ND: True, _TYPE: arr.dtype.str, _KIND: b"", _SHAPE: list(arr.shape), _DATA: arr.data}


def _msgpack_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _array_map(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__} as msgpack")


def json_hook(obj: Any) -> Any:
    """numpy arrays as nested lists and numpy scalars as Python numbers (msgspec's `enc_hook`)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__} as JSON")


_msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=_msgpack_hook)
_json_encoder = msgspec.json.Encoder(enc_hook=json_hook)


def encode_msgpack(obj: Any) -> bytes:
    """Encode Structs, dicts and numpy arrays (as msgpack-numpy maps)."""
    return _msgpack_encoder.encode(obj)


def encode_json(obj: Any) -> bytes:
    """Encode Structs, dicts and numpy arrays (as nested lists)."""
    return _json_encoder.encode(obj)


def _restore_arrays(obj: Any) -> Any:
    if isinstance(obj, dict):
        if obj.get(_ND) is True and _DATA in obj:
            dtype = np.dtype(obj[_TYPE])
            return np.frombuffer(obj[_DATA], dtype=dtype).reshape(obj[_SHAPE])
        return {k: _restore_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore_arrays(v) for v in obj]
    return obj


def decode_msgpack(body: bytes) -> Any:
    """Decode a msgpack body, turning msgpack-numpy maps back into numpy arrays."""
    return _restore_arrays(msgspec.msgpack.decode(body))

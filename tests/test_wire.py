"""msgpack-numpy bytes exactly as sie-sdk 0.10.1 decodes them (sie-native.md, section 4)."""

from __future__ import annotations

import numpy as np

from sie_sdk.wire import decode_msgpack, encode_json, encode_msgpack

SMALLEST = bytes.fromhex(
    "83" "a56d6f64656c" "a16d" "a56974656d73" "91" "81" "a564656e7365" "83" "a464696d73" "02"
    "a56474797065" "a7666c6f61743332" "a676616c756573" "85" "c4026e64" "c3" "c40474797065" "a33c6634"
    "c4046b696e64" "c400" "c40573686170659102" "c40464617461" "c4080000803f00000000" "a674696d696e67" "c0")


def test_smallest_encode_response_is_byte_exact() -> None:
    body = {"model": "m", "items": [{"dense": {"dims": 2, "dtype": "float32",
                                               "values": np.array([1.0, 0.0], dtype=np.float32)}}], "timing": None}
    assert encode_msgpack(body) == SMALLEST


def test_round_trip_and_dtype_strings() -> None:
    cases = [(np.int8, b"\xa3|i1"), (np.uint8, b"\xa3|u1"), (np.float16, b"\xa3<f2"), (np.int32, b"\xa3<i4")]
    for dtype, wire in cases:
        arr = np.arange(4, dtype=dtype)
        packed = encode_msgpack({"a": arr})
        assert wire in packed
        np.testing.assert_array_equal(decode_msgpack(packed)["a"], arr)


def test_json_turns_arrays_into_lists() -> None:
    assert encode_json({"v": np.array([0.5, -1.25], dtype=np.float32)}) == b'{"v":[0.5,-1.25]}'

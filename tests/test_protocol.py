"""The ZeroMQ protocol module polices itself: no torch, every Struct registered, names tell the direction."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import numpy as np

from sie_worker import protocol


def test_importing_the_protocol_pulls_in_no_torch() -> None:
    code = "import sys, sie_worker.protocol, sie_router.app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_every_message_is_in_the_unions_and_names_tell_direction() -> None:
    subclasses = set(protocol.Message.__subclasses__())
    assert subclasses == set(protocol.ALL_MESSAGES)
    to_worker = {"EncodeBatch", "ScoreBatch", "ExtractBatch", "TokenizeBatch", "DecodeBatch", "Ping", "Shutdown"}
    to_router = {"Ready", "LoadFailed", "Alive", "ExportStarting", "BatchDone", "BatchFailed"}
    assert {c.cls.__name__ for c in msgspec.inspect.type_info(protocol.RouterToWorker).types} == to_worker  # type: ignore[attr-defined]
    assert {c.cls.__name__ for c in msgspec.inspect.type_info(protocol.WorkerToRouter).types} == to_router  # type: ignore[attr-defined]
    for cls in protocol.ALL_MESSAGES:
        assert cls.__doc__, f"{cls.__name__} needs a one-line docstring"


def test_batches_and_results_round_trip_without_pickle() -> None:
    dense = np.arange(6, dtype=np.float32).reshape(2, 3)
    done = protocol.BatchDone(batch_id=7, result=protocol.EncodeResult(token_counts=[3, 4],
                                                                       dense=protocol.Tensor.from_numpy(dense)))
    frame = protocol.encode(done)
    assert b"pickle" not in frame
    back = protocol.decode_for_router(frame)
    assert isinstance(back, protocol.BatchDone) and isinstance(back.result, protocol.EncodeResult)
    assert back.result.dense is not None
    np.testing.assert_array_equal(back.result.dense.numpy(), dense)
    batch = protocol.EncodeBatch(batch_id=1, items=[protocol.InputItem(text="hi", images=[b"\x89PNG"])],
                                 output_types=["dense"], is_query=True, options={"pooling": "cls"})
    assert protocol.decode_for_worker(protocol.encode(batch)) == batch


def test_a_router_message_does_not_decode_as_a_worker_message() -> None:
    try:
        protocol.decode_for_router(protocol.encode(protocol.Shutdown()))
    except msgspec.ValidationError:
        return
    raise AssertionError("Shutdown decoded on the router side")

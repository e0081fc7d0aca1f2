"""Fixtures for the extraction and CLIP adapter tests (test process): tiny checkpoints built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sie_worker.adapters import build_adapter
from sie_worker.adapters.base import Adapter
from sie_worker.options import FAMILY_OPTIONS
from sie_worker.protocol import WorkerSpec
from tests import tiny_extract_models as tiny
from tests.adapters.conftest import family_options


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`models(name)`: the dir of a tiny checkpoint (`tiny_extract_models.build_<name>`), built on first use."""
    root = tmp_path_factory.mktemp("tiny_extract")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            if name == "gliner":
                built[name] = tiny.build_gliner(root / name, get("bert"))
            else:
                built[name] = getattr(tiny, f"build_{name}")(root / name)
        return built[name]

    return get


def with_torch_engine(family: str, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """A family the lean engine serves runs torch here unless `options` name another engine."""
    if "engine" not in FAMILY_OPTIONS[family].__struct_fields__:
        return options
    return {"engine": "torch", **(options or {})}


@pytest.fixture
def load() -> Iterator[Callable[..., Adapter]]:
    """`load(family, weights_dir, options={...}, **spec_fields)`: an adapter built and loaded through
    `build_adapter`, closed after."""
    opened: list[Adapter] = []

    def make(family: str, weights_dir: Path, options: dict[str, Any] | None = None, **fields: Any) -> Adapter:
        spec = WorkerSpec(worker_id="w0", model=f"test/{family}", adapter=family, weights_dir=str(weights_dir),
                          to_worker_endpoint="inproc://unused", from_worker_endpoint="inproc://unused",
                          options=family_options(family, with_torch_engine(family, options)), **fields)
        adapter = build_adapter(spec)
        adapter.load()
        opened.append(adapter)
        return adapter

    yield make
    for adapter in opened:
        adapter.close()

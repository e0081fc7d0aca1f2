"""The runtime model store (`router/models/store.py`): one JSON file, replaced atomically, read back at start."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sie_router.models.store import ModelStore
from sie_sdk.types import AddModelRequest


def test_put_and_remove_rewrite_the_file_and_a_new_store_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "models.json"  # its folder is made on the first write
    store = ModelStore(path)
    assert store.models == {} and not path.exists()
    store.put(AddModelRequest(model="org/a", adapter="dense", loadtime={"engine": "onnx"}))
    store.put(AddModelRequest(model="org/b", served_model_name="b", load=True))
    assert json.loads(path.read_text()) == {"models": [
        {"model": "org/a", "adapter": "dense", "loadtime": {"engine": "onnx"}},
        {"model": "org/b", "served_model_name": "b", "load": True}]}
    assert store.remove("b") and not store.remove("b")
    assert list(ModelStore(path).models) == ["org/a"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["models.json"]


def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "models.json"
    store = ModelStore(path)
    store.put(AddModelRequest(model="org/a"))
    before = path.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        store.put(AddModelRequest(model="org/b"))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["models.json"]


def test_an_unreadable_file_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text('{"models": [{"model": "a", "no_such_field": 1}]}')
    with pytest.raises(ValueError, match=f"cannot read the model store {path}"):
        ModelStore(path)


def test_without_a_file_the_list_lives_in_memory() -> None:
    store = ModelStore(None)
    store.put(AddModelRequest(model="org/a"))
    assert list(store.models) == ["org/a"]

"""The dense adapter's ONNX Runtime engine against its torch engine and sentence-transformers (CPU, packaged MiniLM)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sie_worker.adapters import onnx_engine
from tests.adapters.conftest import MakeAdapter, encode
from tests.sentences import SENTENCES

pytest.importorskip("onnxruntime")

# Varied lengths and scripts, more than two micro-batches, so bucketing and padding are exercised.
TEXTS = ["berlin", "what is the capital of france?", "Ünïcödé, emoji 🙂 and 数字 123", "a " * 300,
         *SENTENCES[:36]]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def onnx_adapter(make_adapter: MakeAdapter, minilm_dir: Path, cache: Path) -> Any:
    return make_adapter("dense", minilm_dir, threads=2, loadtime={"engine": "onnx", "onnx_cache_dir": str(cache)})


def test_onnx_matches_torch_and_sentence_transformers(make_adapter: MakeAdapter, minilm_dir: Path,
                                                      reference_model: Any, tmp_path: Path) -> None:
    adapter = onnx_adapter(make_adapter, minilm_dir, tmp_path)
    assert adapter.onnx is not None and adapter.onnx.export_s is not None, "the first load exports"
    got = encode(adapter, TEXTS, ["dense"]).dense.numpy()
    torch_engine = encode(make_adapter("dense", minilm_dir, threads=2), TEXTS, ["dense"]).dense.numpy()
    expected = reference_model.encode(TEXTS, convert_to_numpy=True)
    for other in (torch_engine, expected):
        assert cosines(got, other).min() >= 0.999
        assert np.abs(got - other).max() < 1e-4  # measured: ~2e-7 against torch


def test_lanes_run_buckets_side_by_side_and_agree_with_one_lane(make_adapter: MakeAdapter, minilm_dir: Path,
                                                                tmp_path: Path) -> None:
    lanes = onnx_adapter(make_adapter, minilm_dir, tmp_path)  # 2 worker threads: 2 lanes of 1 thread by default
    single = make_adapter("dense", minilm_dir, threads=2,
                          loadtime={"engine": "onnx", "onnx_cache_dir": str(tmp_path), "onnx_lanes": 1})
    assert lanes.onnx is not None and single.onnx is not None
    assert (lanes.onnx.lanes, lanes.onnx.session.get_session_options().intra_op_num_threads) == (2, 1)
    assert (single.onnx.lanes, single.onnx.session.get_session_options().intra_op_num_threads) == (1, 2)
    callers: set[int] = set()
    run = lanes.onnx.run

    def recording(tensors: dict[str, torch.Tensor]) -> np.ndarray:
        callers.add(threading.get_ident())
        return run(tensors)

    lanes.onnx.run = recording  # type: ignore[method-assign]
    got = encode(lanes, TEXTS, ["dense"]).dense.numpy()
    assert len(callers) == 2, "the buckets of one batch ran on both lanes"
    np.testing.assert_allclose(got, encode(single, TEXTS, ["dense"]).dense.numpy(), atol=1e-5)
    callers.clear()
    encode(lanes, ["one lone sentence"], ["dense"])
    assert len(callers) == 1


def test_a_second_load_reuses_the_cached_graph(make_adapter: MakeAdapter, minilm_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    first = onnx_adapter(make_adapter, minilm_dir, tmp_path)
    assert first.onnx is not None and first.onnx.export_s is not None

    def no_export(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached graph should have been reused")

    monkeypatch.setattr(onnx_engine, "export", no_export)
    second = onnx_adapter(make_adapter, minilm_dir, tmp_path)
    assert second.onnx is not None and second.onnx.export_s is None and second.onnx.path == first.onnx.path
    np.testing.assert_allclose(encode(second, TEXTS[:8], ["dense"]).dense.numpy(),
                               encode(first, TEXTS[:8], ["dense"]).dense.numpy(), atol=1e-6)


def test_a_failing_export_falls_back_to_torch(make_adapter: MakeAdapter, minilm_dir: Path, reference_model: Any,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with caplog.at_level(logging.WARNING, logger="sie.worker.onnx"):
        adapter = onnx_adapter(make_adapter, minilm_dir, tmp_path)
    assert adapter.onnx is None and adapter.model is not None
    assert any("exporter exploded" in r.getMessage() and "using torch" in r.getMessage() for r in caplog.records)
    got = encode(adapter, TEXTS, ["dense"]).dense.numpy()
    assert cosines(got, reference_model.encode(TEXTS, convert_to_numpy=True)).min() >= 0.999


def test_a_graph_that_disagrees_with_torch_is_refused(make_adapter: MakeAdapter, minilm_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(onnx_engine.OnnxEncoder, "run", lambda self, tensors: np.random.default_rng(0).standard_normal(
        (*tensors["input_ids"].shape, 384)).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="sie.worker.onnx"):
        adapter = onnx_adapter(make_adapter, minilm_dir, tmp_path)
    assert adapter.onnx is None and any("disagrees with torch" in r.getMessage() for r in caplog.records)


def test_an_unwritable_cache_exports_into_a_temporary_folder(make_adapter: MakeAdapter, minilm_dir: Path,
                                                             tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    adapter = onnx_adapter(make_adapter, minilm_dir, blocker / "onnx")
    assert adapter.onnx is not None and not adapter.onnx.path.exists(), "the temporary export is removed after load"
    assert encode(adapter, ["hello"], ["dense"]).dense.numpy().shape == (1, 384)


def test_auto_uses_torch_for_bfloat16_and_rejects_unknown_engines(make_adapter: MakeAdapter, minilm_dir: Path,
                                                                  tmp_path: Path) -> None:
    adapter = make_adapter("dense", minilm_dir, compute_precision="bfloat16",
                           loadtime={"engine": "auto", "onnx_cache_dir": str(tmp_path)})
    assert adapter.onnx is None and not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unknown engine"):
        make_adapter("dense", minilm_dir, loadtime={"engine": "tensorrt"})


def test_a_long_batch_does_not_leave_the_worker_at_its_high_water_mark(make_adapter: MakeAdapter, minilm_dir: Path,
                                                                       tmp_path: Path) -> None:
    """ORT's arena is off and the heap is trimmed after a large batch: one 64 x 256 batch of MiniLM grew the process
    by ~560 MiB with the arena on (measured; bench/onnx_memory.py) and by ~0 without it."""
    psutil = pytest.importorskip("psutil")
    adapter = make_adapter("dense", minilm_dir, threads=2, max_sequence_length=256,
                           loadtime={"engine": "onnx", "onnx_cache_dir": str(tmp_path)})
    assert adapter.onnx is not None
    encode(adapter, TEXTS[:8], ["dense"])
    before = psutil.Process().memory_info().rss
    result = encode(adapter, [f"word{i} " * 300 for i in range(64)], ["dense"])
    assert max(result.token_counts) == 256, "the batch really was 64 x 256 tokens"
    grown = psutil.Process().memory_info().rss - before
    assert grown < 100 * 2**20, f"the process kept {grown / 2**20:.0f} MiB after one long batch"

"""The graph cache (graph_cache, export_lock, probe_record) with a tiny dense checkpoint and the real export helper:
bounded exports, one per key at a time, nothing stale or incomplete served, the probe check once per cache entry."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sie_router.settings import Settings
from sie_worker.adapters import export_lock, graph_cache, graph_runtime
from tests import declared, tiny_models

declared.module("openvino")
declared.module("onnxruntime")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_dense_st(tmp_path_factory.mktemp("tiny") / "dense")


@pytest.fixture
def weights(tiny_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint this test may rewrite."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "weights"))


@pytest.fixture
def helper_runs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The export helper's command lines, run for real."""
    runs: list[list[str]] = []
    real = subprocess.run

    def counted(command: list[str], *args: Any, **kwargs: Any) -> Any:
        if "sie_worker.export_graph" in command:
            runs.append(command)
        return real(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counted)
    return runs


def graph_folders(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name not in ("index", "locks") and not p.name.startswith(".")]


def test_the_export_ends_before_the_router_gives_up_on_the_load() -> None:
    """A slow export falls back to torch with time left to load on torch, rather than the router killing the worker
    at its load timeout (the default one: a lower one set by hand kills the worker, and its helper with it)."""
    load_timeout = Settings().load_timeout_s
    assert load_timeout >= graph_cache.EXPORT_TIMEOUT_S + graph_cache.LOAD_AFTER_EXPORT_S


class Waiting(logging.Handler):
    """Sets `seen` when a load logs that it waits for another's export."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for another worker's export" in record.getMessage():
            self.seen.set()


def test_two_loads_of_one_key_run_one_export(weights: Path, tmp_path: Path, helper_runs: list[list[str]],
                                            monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A second load starts once the first holds the key's lock and before its helper runs; the first's helper runs
    only once the second is seen waiting. The second then serves the first's graph: one helper run in all."""
    root = tmp_path / "graphs"
    second: list[graph_cache.Graph | None] = []
    other = threading.Thread(target=lambda: second.append(graph_cache.ensure_graph(weights, root)))
    waiting = Waiting()
    counted = subprocess.run

    def first_waits_for_the_second(command: list[str], *args: Any, **kwargs: Any) -> Any:
        if "sie_worker.export_graph" in command and not other.is_alive() and not helper_runs:
            other.start()
            assert waiting.seen.wait(timeout=120), "the second load did not wait for the first's export"
        return counted(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", first_waits_for_the_second)
    logger = logging.getLogger("sie.worker.graph")
    logger.addHandler(waiting)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            first = graph_cache.ensure_graph(weights, root)
            other.join(timeout=120)
    finally:
        logger.removeHandler(waiting)
    assert first is not None and second and second[0] is not None and second[0].folder == first.folder
    assert len(helper_runs) == 1, helper_runs


def test_exports_of_other_keys_wait_for_a_free_slot(weights: Path, tmp_path: Path, helper_runs: list[list[str]],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """With every export slot taken (here the one slot, held by this test as another export would), a load of a new
    key runs no helper: it waits for a slot until the export deadline, then serves torch with one warning. Once the
    slot is free, the same load exports."""
    root = tmp_path / "graphs"
    monkeypatch.setattr(export_lock, "export_slots", lambda: 1)
    monkeypatch.setattr(graph_cache, "EXPORT_TIMEOUT_S", 1.0)
    with export_lock.export_slot(root, deadline=float("inf")) as held:
        assert held is not None
        with caplog.at_level(logging.INFO, logger="sie.worker.graph"):
            assert graph_cache.ensure_graph(weights, root) is None
    said = [r.getMessage() for r in caplog.records]
    assert any("waiting for a free export slot (1 export(s) at a time" in line for line in said), said
    assert any("no export slot came free" in line and "serving it with torch" in line for line in said), said
    assert helper_runs == []
    monkeypatch.setattr(graph_cache, "EXPORT_TIMEOUT_S", 420.0)
    assert graph_cache.ensure_graph(weights, root) is not None and len(helper_runs) == 1


def test_a_folder_missing_a_file_is_exported_again(weights: Path, tmp_path: Path,
                                                   helper_runs: list[list[str]]) -> None:
    root = tmp_path / "graphs"
    graph = graph_cache.ensure_graph(weights, root)
    assert graph is not None and len(helper_runs) == 1
    assert graph_cache.ensure_graph(weights, root) is not None and len(helper_runs) == 1, "a complete folder is used"
    for name in ("probe.npz", "openvino.bin"):
        (graph.folder / name).unlink()
        again = graph_cache.ensure_graph(weights, root)
        assert again is not None and again.folder == graph.folder and (graph.folder / name).is_file()
    assert len(helper_runs) == 3
    (graph.folder / "tokenizer.json").write_text("{}")  # truncated, as by a full disk
    assert graph_cache.ensure_graph(weights, root) is not None and len(helper_runs) == 4
    assert graph_folders(root) == [graph.folder]


def test_a_weight_rewritten_with_cp_p_is_exported_again(weights: Path, tmp_path: Path,
                                                       helper_runs: list[list[str]]) -> None:
    """`cp -p` keeps the size and the modification time, and writes other bytes: the key must follow them."""
    root = tmp_path / "graphs"
    first = graph_cache.ensure_graph(weights, root)
    assert first is not None
    target = weights / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-4:] = np.float32(0.5).tobytes()  # the last value of the last tensor: still a valid checkpoint
    rewritten = tmp_path / "model.safetensors"
    rewritten.write_bytes(bytes(data))
    before = target.stat()
    os.utime(rewritten, ns=(before.st_atime_ns, before.st_mtime_ns))
    subprocess.run(["cp", "-p", str(rewritten), str(target)], check=True)
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert target.read_bytes() == bytes(data)
    second = graph_cache.ensure_graph(weights, root)
    assert second is not None and second.folder != first.folder and len(helper_runs) == 2


def test_staging_left_by_a_dead_export_is_removed_even_on_a_cache_hit(weights: Path, tmp_path: Path) -> None:
    """Staging folders whose key nobody holds are removed by the next load, exporting or not; one whose key is
    locked (its export is running) is kept. So are GRAPH_FORMAT 2's pid-named ones whose helper lives."""
    root = tmp_path / "graphs"
    assert graph_cache.ensure_graph(weights, root) is not None
    free, busy = "a" * 32, "b" * 32
    left = [root / f".export-{free}-999999-x", root / f".export-{os.getpid() + 10**7}-y"]
    kept = [root / f".export-{busy}-999999-z", root / f".export-{os.getpid()}-w"]
    for folder in [*left, *kept]:
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"partial")
    (root / "locks").mkdir(exist_ok=True)
    with export_lock.lock_path(root, busy).open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert graph_cache.ensure_graph(weights, root) is not None
    assert not any(folder.exists() for folder in left)
    assert all(folder.exists() for folder in kept)


def test_the_probe_runs_once_per_cache_entry_and_covers_the_longest_input(
        weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first load of each runtime and precision probes and records it; later loads trust the record. The probe
    includes a batch at the model's maximum length (128 for the tiny model), which a runtime wrong only on long
    inputs fails."""
    graph = graph_cache.ensure_graph(weights, tmp_path / "graphs")
    assert graph is not None
    (_, short), (long_feed, long_hidden) = graph.probes()
    assert long_feed["input_ids"].shape == (2, 128) and long_hidden.shape == (2, 128, 32)
    assert long_feed["attention_mask"].sum(axis=1).tolist() == [128, 96] and short.shape[1] <= 64
    probed: list[str] = []
    real = graph_runtime.probe_cosine

    def counted(runtime: Any, graph: graph_cache.Graph) -> float:
        probed.append(runtime.describe())
        return real(runtime, graph)

    monkeypatch.setattr(graph_runtime, "probe_cosine", counted)
    for kind, precision in [("onnxruntime", "auto"), ("openvino", "float32"), ("onnxruntime", "auto"),
                            ("openvino", "float32")]:
        graph_runtime.open_runtime(kind, graph, threads=1, lanes=1, precision=precision)
    assert len(probed) == 2, probed
    assert len(list((graph.folder / "checks").iterdir())) == 2

    class WrongWhenLong:
        """ONNX Runtime's output, off on inputs over 64 tokens only."""

        lanes = 1

        def __init__(self) -> None:
            self.inner = graph_runtime.OrtRuntime(graph, 1, 1)

        def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
            hidden = self.inner.run(feed)
            return hidden[:, ::-1] if hidden.shape[1] > 64 else hidden

        def describe(self) -> str:
            return "onnxruntime, wrong when long"

        def computes(self) -> str:
            return "f32"

    wrong = WrongWhenLong()
    short_feed, short_hidden = graph.probes()[0]
    cosine = graph_cache.masked_min_cosine(short_hidden, wrong.run(short_feed), short_feed["attention_mask"])
    assert cosine >= graph_cache.MIN_COSINE, "the short texts alone would have passed it"
    assert real(wrong, graph) < graph_cache.MIN_COSINE


@pytest.mark.parametrize("head", [graph_cache.HIDDEN, graph_cache.SEQUENCE_LOGITS, graph_cache.TOKEN_LOGITS,
                                  graph_cache.splade_head("max", "relu"), graph_cache.CLIP_TEXT])
def test_an_output_that_is_not_finite_never_agrees(head: str) -> None:
    """NaN compares false with every bar, so a NaN agreement would pass `cosine < bar` checks: it counts as -1."""
    shape = (2, 3) if head in (graph_cache.SEQUENCE_LOGITS, graph_cache.CLIP_TEXT) else (2, 4, 3)
    expected = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    mask = np.ones((2, 4), np.int64)
    assert graph_cache.agreement(head, expected, expected.copy(), mask) == pytest.approx(1.0)
    for bad in (np.nan, np.inf):
        got = expected.copy()
        got[0, 0] = bad
        assert graph_cache.agreement(head, expected, got, mask) == -1.0
        assert graph_cache.agreement(head, got, expected, mask) == -1.0


def test_a_runtime_whose_probe_output_is_nan_is_rejected(weights: Path, tmp_path: Path) -> None:
    graph = graph_cache.ensure_graph(weights, tmp_path / "graphs")
    assert graph is not None

    class NaNOnLong:
        """ONNX Runtime's output, NaN on the long probe only (the second batch: min() over NaN kept the first)."""

        def __init__(self) -> None:
            self.inner = graph_runtime.OrtRuntime(graph, 1, 1)

        def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
            hidden = self.inner.run(feed)
            return np.full_like(hidden, np.nan) if hidden.shape[1] > 64 else hidden

    assert graph_runtime.probe_cosine(NaNOnLong(), graph) == -1.0  # type: ignore[arg-type]


def test_the_helper_refuses_a_graph_whose_output_is_nan(tiny_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The export's own check against torch: a graph that computes NaN is neither written packed nor padded."""
    from sie_worker import export_graph

    real = export_graph.onnx_hidden

    def nan_outputs(*args: Any, **kwargs: Any) -> list[np.ndarray]:
        return [np.full_like(hidden, np.nan) for hidden in real(*args, **kwargs)]

    monkeypatch.setattr(export_graph, "onnx_hidden", nan_outputs)
    assert export_graph.main([str(tiny_dir), str(tmp_path / "graph")]) == graph_cache.NOT_EXPORTABLE
    assert not (tmp_path / "graph").exists()


def test_a_change_to_the_export_code_changes_every_cache_key(tiny_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry exported by other export code is never read as this code's: its source is in the key."""
    names = {path.name for path in graph_cache.exporter_sources()}
    assert {"export_graph.py", "export_packed.py", "export_heads.py", "packed_feed.py"} <= names
    worker = tmp_path / "worker"
    (worker / "adapters").mkdir(parents=True)
    (worker / "export_graph.py").write_text("ATTENTION = 'sdpa'\n")
    (worker / "adapters" / "packed_feed.py").write_text("TOKEN_MULTIPLE = 8\n")
    digest = graph_cache.exporter_digest.__wrapped__  # uncached: the same folder is read twice
    before = digest(worker)
    (worker / "export_graph.py").write_text("ATTENTION = 'eager'\n")
    assert digest(worker) != before
    keys = set()
    for code in ("one", "another"):
        monkeypatch.setattr(graph_cache, "exporter_digest", lambda code=code: code)
        keys.add(graph_cache.cache_key(tiny_dir))
    assert len(keys) == 2

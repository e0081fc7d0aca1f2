"""Lean dense workers: the exported graph under OpenVINO and ONNX Runtime against sentence-transformers (packaged
MiniLM), the graph cache and its export helper process, the fallbacks to torch, and the memory a long batch leaves."""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import psutil
import pytest
from transformers import AutoTokenizer

from sie_router.errors import LoadError
from sie_router.pool.supervisor import Supervisor
from sie_router.settings import Settings
from sie_worker import tokens
from sie_worker.adapters import dense_lean, graph_cache, graph_runtime
from sie_worker.adapters.base import BadInput, InputTooLong
from sie_worker.adapters.batching import split_for_lanes
from sie_worker.adapters.dense import DenseAdapter
from sie_worker.adapters.dense_lean import LeanDenseAdapter
from sie_worker.adapters.text_tokenizer import TextTokenizer
from sie_worker.options import DenseOptions, Engine
from sie_worker.protocol import DecodeBatch, EncodeBatch, InputItem, TokenizeBatch, WorkerSpec
from tests import declared, precision, tiny_models
from tests.adapters.conftest import MakeAdapter, ThreadNames, encode
from tests.sentences import SENTENCES

declared.module("openvino")
declared.module("onnxruntime")

# Varied lengths and scripts, more than two micro-batches, so bucketing and padding are exercised.
TEXTS = ["berlin", "what is the capital of france?", "Ünïcödé, emoji 🙂 and 数字 123", "a " * 300,
         *SENTENCES[:36]]
REPO = Path(__file__).resolve().parents[2]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def cache(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A graph cache holding MiniLM's export, made once by the real helper process."""
    root = tmp_path_factory.mktemp("graphs")
    assert graph_cache.ensure_graph(minilm_dir, root) is not None
    return root


def lean(make_adapter: MakeAdapter, minilm_dir: Path, cache: Path, engine: str = "auto", **fields: Any) -> Any:
    options = {"engine": engine, "onnx_cache_dir": str(cache), **fields.pop("options", {})}
    return make_adapter("dense", minilm_dir, threads=2, options=options, **fields)


OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16"}


@pytest.mark.parametrize(("engine", "dtype"), [*(("openvino", p) for p in precision.cpu_precisions()),
                                               ("onnx", "float32")])
def test_each_runtime_and_precision_matches_sentence_transformers(make_adapter: MakeAdapter, minilm_dir: Path,
                                                                  cache: Path, reference_model: Any, engine: str,
                                                                  dtype: precision.Precision) -> None:
    adapter = lean(make_adapter, minilm_dir, cache, engine, compute_precision=dtype)
    assert isinstance(adapter, LeanDenseAdapter)
    described = adapter.lanes.runtime.describe()
    assert described.startswith({"openvino": "openvino", "onnx": "onnxruntime"}[engine])
    if engine == "openvino":  # the precision asked for is the one that runs: no silent float32
        assert f"({OPENVINO_PRECISION[dtype]}," in described, described
    texts = [*TEXTS, " ".join(TEXTS * 8)]  # and one past max_seq_length, truncated as sentence-transformers does
    got = encode(adapter, texts, ["dense"]).dense.numpy()
    precision.assert_vectors_close(got, reference_model.encode(texts, convert_to_numpy=True),
                                   precision.tolerance(dtype))


def test_the_first_load_exports_in_a_helper_and_later_loads_reuse_the_cache(
        make_adapter: MakeAdapter, minilm_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = [p for p in cache.iterdir() if p.name not in ("index", "locks")]
    assert len(folders) == 1 and len(list((cache / "index").iterdir())) == 1
    names = {p.name for p in folders[0].iterdir()}
    assert {*graph_cache.FILES, "openvino.xml", "openvino.bin"} <= names

    def no_helper(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached graph should have been reused")

    monkeypatch.setattr(subprocess, "run", no_helper)
    adapter = lean(make_adapter, minilm_dir, cache)
    assert isinstance(adapter, LeanDenseAdapter) and adapter.graph.folder == folders[0]


def test_the_key_is_remembered_by_fingerprint_and_rehashed_when_a_file_changes(
        minilm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(minilm_dir, weights)
    root = tmp_path / "graphs"
    key = graph_cache.indexed_key(weights, root)
    assert key == graph_cache.cache_key(weights) and (root / "index" / graph_cache.fingerprint(weights)).is_file()
    hashed: list[Path] = []
    real = graph_cache.cache_key
    monkeypatch.setattr(graph_cache, "cache_key", lambda path, *head: hashed.append(path) or real(path, *head))
    assert graph_cache.indexed_key(weights, root) == key and hashed == [], "the second load hashes nothing"
    config = weights / "config.json"
    config.write_text(config.read_text().replace("}", ', "note": "changed"}', 1))
    assert graph_cache.indexed_key(weights, root) != key and hashed == [weights]


def test_a_lean_worker_never_imports_torch_or_transformers(minilm_dir: Path, cache: Path) -> None:
    """In a fresh interpreter, as `python -m sie_worker` runs it: build, load and encode through the lean path."""
    script = f"""
import sys
from sie_worker.adapters import build_adapter
from sie_worker.options import DenseOptions
from sie_worker.protocol import EncodeBatch, InputItem, WorkerSpec
spec = WorkerSpec(worker_id="w", model="m", adapter="dense", weights_dir={str(minilm_dir)!r}, threads=2,
                  to_worker_endpoint="inproc://a", from_worker_endpoint="inproc://b",
                  options=DenseOptions(engine="auto", onnx_cache_dir={str(cache)!r}))
adapter = build_adapter(spec)
adapter.load()
adapter.forward(adapter.prepare(EncodeBatch(batch_id=1, items=[InputItem(text="hello")], output_types=["dense"])))
print(type(adapter).__name__, sorted(m for m in ("torch", "transformers", "httpx") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "LeanDenseAdapter []"


def test_a_worker_killed_during_its_export_leaves_no_helper_and_the_next_load_succeeds(tmp_path: Path) -> None:
    """A real worker (`python -m sie_worker`, under the router's supervisor) SIGKILLed while its helper writes the
    graph: the helper dies with it, and the next worker exports again, removing the dead helper's staging folder."""
    weights, cache = tiny_models.build_dense_st(tmp_path / "tiny"), tmp_path / "graphs"

    async def scenario() -> None:
        supervisor = Supervisor(Settings(load_timeout_s=300, ping_interval_s=0), on_exit=lambda *_: None)
        supervisor.start()
        client = supervisor.client
        spec = functools.partial(
            WorkerSpec, model="test/tiny", adapter="dense", weights_dir=str(weights), threads=1,
            to_worker_endpoint=client.to_worker_endpoint, from_worker_endpoint=client.from_worker_endpoint,
            options=DenseOptions(engine="onnx", onnx_cache_dir=str(cache)))
        try:
            loading = asyncio.create_task(supervisor.spawn(spec(worker_id="first"), "test/tiny"))
            deadline = time.monotonic() + 240
            while not list(cache.glob(".export-*")):  # the helper is writing the graph
                assert time.monotonic() < deadline and not loading.done(), "no export started"
                await asyncio.sleep(0.05)
            worker = psutil.Process(supervisor.workers["first"].process.pid)
            (helper,) = [p for p in worker.children() if "sie_worker.export_graph" in p.cmdline()]
            worker.kill()
            with pytest.raises(LoadError):
                await loading
            helper.wait(timeout=30)  # raises if it outlives its worker
            # Killed with its worker, not left to finish its export as an orphan: no graph yet, its staging left.
            assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".export-")) == ["index", "locks"]
            ready = await supervisor.spawn(spec(worker_id="second"), "test/tiny")
            assert ready.info is not None and ready.info.dims["dense"] == 32
            assert not list(cache.glob(".export-*")), "the dead helper's staging folder is left behind"
            assert len([p for p in cache.iterdir() if p.name not in ("index", "locks")]) == 1  # one complete graph
        finally:
            await supervisor.stop(list(supervisor.workers.values()), 10)
            await supervisor.close()

    asyncio.run(scenario())


def test_a_checkpoint_the_helper_cannot_export_is_served_by_torch(make_adapter: MakeAdapter, tmp_path: Path,
                                                                  minilm_dir: Path, reference_model: Any,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A real helper run that fails (weights it cannot load): no graph, a warning, and the torch adapter."""
    broken = tmp_path / "broken"
    shutil.copytree(minilm_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="sie.worker.graph"):
        assert graph_cache.ensure_graph(broken, tmp_path / "graphs") is None
    assert any("serving it with torch" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in (tmp_path / "graphs").iterdir()) == ["index", "locks"], \
        "a failed export leaves no graph behind"
    (broken / "model.safetensors").write_bytes(b"still broken")  # so that build_adapter's helper fails too
    with pytest.raises(Exception):  # noqa: B017  the torch adapter fails on these weights as it should
        lean(make_adapter, broken, tmp_path / "graphs")
    shutil.copy(minilm_dir / "model.safetensors", broken / "model.safetensors")
    adapter = lean(make_adapter, broken, tmp_path / "graphs", engine="torch")
    assert isinstance(adapter, DenseAdapter)
    got = encode(adapter, TEXTS[:6], ["dense"]).dense.numpy()
    assert cosines(got, reference_model.encode(TEXTS[:6], convert_to_numpy=True)).min() >= 0.999


def test_the_helper_refuses_a_graph_that_disagrees_with_torch(minilm_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from sie_worker import export_graph

    monkeypatch.setattr(export_graph, "agreement", lambda *args: 0.5)
    assert export_graph.main([str(minilm_dir), str(tmp_path / "graph")]) == graph_cache.NOT_EXPORTABLE
    assert not (tmp_path / "graph").exists() and not list(tmp_path.iterdir()), "the staging folder is removed"


def test_no_graph_means_the_torch_adapter(make_adapter: MakeAdapter, minilm_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph_cache, "ensure_graph", lambda *args: None)
    assert isinstance(lean(make_adapter, minilm_dir, tmp_path), DenseAdapter)


def test_a_runtime_that_disagrees_on_the_probe_falls_back(make_adapter: MakeAdapter, minilm_dir: Path, cache: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """OpenVINO's bf16 under the bar: reopened in float32; float32 under it too: the torch adapter. On a copy of the
    cache without probe records, which would otherwise spare the probe (and keep these results from the others). A CPU
    without native bf16 opens float32 at once: nothing to reopen, so nothing to warn of."""
    cache = shutil.copytree(cache, tmp_path / "graphs", ignore=shutil.ignore_patterns("checks"))
    real = graph_runtime.probe_cosine

    def bf16_off(runtime: Any, graph: Any) -> float:
        return 0.99 if getattr(runtime, "precision", "") == "bf16" else real(runtime, graph)

    monkeypatch.setattr(graph_runtime, "probe_cosine", bf16_off)
    with caplog.at_level(logging.WARNING, logger="sie.worker.graph"):
        adapter = lean(make_adapter, minilm_dir, cache)
    assert isinstance(adapter, LeanDenseAdapter) and "f32" in adapter.lanes.runtime.describe()
    reopened = any("using float32" in r.getMessage() for r in caplog.records)
    assert reopened == precision.has_native_bf16()
    for records in cache.glob("*/checks"):
        shutil.rmtree(records)
    monkeypatch.setattr(graph_runtime, "probe_cosine", lambda *args: 0.5)
    assert isinstance(lean(make_adapter, minilm_dir, cache), DenseAdapter)


def test_which_runtime_a_spec_gets(minilm_dir: Path) -> None:
    def spec(engine: Engine | None = None, **fields: Any) -> WorkerSpec:
        return WorkerSpec(worker_id="w", model="m", adapter="dense", weights_dir=str(minilm_dir),
                          to_worker_endpoint="a", from_worker_endpoint="b",
                          options=None if engine is None else DenseOptions(engine=engine), **fields)

    assert dense_lean.runtimes_for(spec("auto")) == ["openvino", "onnxruntime"]
    assert dense_lean.runtimes_for(spec("openvino")) == ["openvino", "onnxruntime"]
    assert dense_lean.runtimes_for(spec("onnx")) == ["onnxruntime"]
    assert dense_lean.runtimes_for(spec("onnx", compute_precision="bfloat16")) == []
    assert dense_lean.runtimes_for(spec("auto", compute_precision="bfloat16")) == ["openvino"]
    assert dense_lean.runtimes_for(spec("auto", device="cuda:0")) == []
    assert dense_lean.runtimes_for(spec("torch")) == []
    assert dense_lean.runtimes_for(spec()) == ["openvino", "onnxruntime"], "without options, the server's default"
    with pytest.raises(msgspec.ValidationError, match="engine"):  # what the router and the spawned worker decode
        msgspec.convert({"engine": "tensorrt"}, DenseOptions)


@pytest.mark.parametrize("engine", ["openvino", "onnx"])
def test_lanes_run_buckets_side_by_side_and_agree_with_one_lane(make_adapter: MakeAdapter, minilm_dir: Path,
                                                                cache: Path, engine: str) -> None:
    lanes = lean(make_adapter, minilm_dir, cache, engine, options={"onnx_lanes": 2})
    single = lean(make_adapter, minilm_dir, cache, engine, options={"onnx_lanes": 1})
    assert (lanes.lanes.runtime.lanes, single.lanes.runtime.lanes) == (2, 1)
    callers: set[int] = set()
    run = lanes.lanes.runtime.run

    def recording(feed: dict[str, np.ndarray]) -> np.ndarray:
        callers.add(threading.get_ident())
        return run(feed)

    alone: list[int] = []
    run_alone = lanes.lanes.runtime.run_alone

    def recording_alone(feed: dict[str, np.ndarray]) -> np.ndarray:
        alone.append(len(feed["input_ids"]))
        return run_alone(feed)

    lanes.lanes.runtime.run, lanes.lanes.runtime.run_alone = recording, recording_alone
    got = encode(lanes, TEXTS, ["dense"]).dense.numpy()
    assert len(callers) == 2 and not alone, "the buckets of one batch ran on both lanes"
    assert cosines(got, encode(single, TEXTS, ["dense"]).dense.numpy()).min() > 0.99999
    callers.clear()
    lone = encode(lanes, ["one lone sentence"], ["dense"]).dense.numpy()
    assert not callers and alone == [1], "a lone bucket runs alone, on every thread"
    assert cosines(lone, encode(single, ["one lone sentence"], ["dense"]).dense.numpy()).min() > 0.99999


def test_a_batch_started_early_runs_behind_the_running_batch_on_a_freed_lane(make_adapter: MakeAdapter,
                                                                             minilm_dir: Path, cache: Path) -> None:
    """The worker's prepare thread starts batch n+1 while batch n runs: a lane that is done with batch n's calls
    takes batch n+1's before anyone has waited on batch n, and both batches get the vectors they get alone."""
    adapter = lean(make_adapter, minilm_dir, cache, "openvino", options={"onnx_lanes": 2})
    first_texts, second_texts = TEXTS[:20], TEXTS[20:]
    first, second = (adapter.prepare(EncodeBatch(batch_id=i, items=[InputItem(text=t) for t in texts],
                                                 output_types=["dense"]))
                     for i, texts in ((1, first_texts), (2, second_texts)))
    second_ids = [feed["input_ids"] for _, feed in split_for_lanes(second.inputs, 2)]
    run = adapter.lanes.runtime.run
    release_first, second_began = threading.Event(), threading.Event()
    held: list[int] = []

    def gated(feed: dict[str, np.ndarray]) -> np.ndarray:
        if not held:  # the first call of all (the first batch's longest) holds its lane until released
            held.append(id(feed))
            assert release_first.wait(120)
        if any(ids.shape == feed["input_ids"].shape and (ids == feed["input_ids"]).all() for ids in second_ids):
            second_began.set()
        return run(feed)

    adapter.lanes.runtime.run = gated
    adapter.start(first)
    adapter.start(second)
    assert len(first.extra["started"][0]) >= 2, "the first batch has a call for each lane"
    # Nobody waits on the first batch, and its longest call still holds a lane: the other lane has gone on.
    assert second_began.wait(120), "the second batch's calls began on the lane the first batch freed"
    release_first.set()
    got_first, got_second = adapter.forward(first).dense.numpy(), adapter.forward(second).dense.numpy()
    adapter.lanes.runtime.run = run
    assert cosines(got_first, encode(adapter, first_texts, ["dense"]).dense.numpy()).min() > 0.99999
    assert cosines(got_second, encode(adapter, second_texts, ["dense"]).dense.numpy()).min() > 0.99999


def test_a_batch_is_tokenised_on_every_thread_only_while_the_lanes_are_idle(make_adapter: MakeAdapter,
                                                                         minilm_dir: Path, cache: Path) -> None:
    """A batch that arrives to idle lanes waits for its tokens, so every thread tokenises it; one prepared while a
    batch's calls run is tokenised on one thread beside them (lean_engine.tokenize_parts). Both get the vectors they
    get alone."""
    adapter = lean(make_adapter, minilm_dir, cache, "openvino", options={"onnx_lanes": 2})
    spy = ThreadNames(adapter.session.tokenizer.backend)
    adapter.session.tokenizer.backend = spy
    texts = TEXTS[:20]
    batch = EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in texts], output_types=["dense"])
    first = adapter.prepare(batch)
    assert len(spy.names) == 2, "idle lanes: the batch split over the worker's two threads"
    run = adapter.lanes.runtime.run
    release, began = threading.Event(), threading.Event()

    def held(feed: dict[str, np.ndarray]) -> np.ndarray:
        began.set()
        assert release.wait(120)
        return run(feed)

    adapter.lanes.runtime.run = held
    try:
        adapter.start(first)
        assert began.wait(120)
        spy.names.clear()
        second = adapter.prepare(EncodeBatch(batch_id=2, items=batch.items, output_types=["dense"]))
        assert spy.names == {threading.current_thread().name}, "busy lanes: one thread, the preparing one"
    finally:
        release.set()
    got_first, got_second = adapter.forward(first).dense.numpy(), adapter.forward(second).dense.numpy()
    adapter.lanes.runtime.run = run
    alone = encode(adapter, texts, ["dense"]).dense.numpy()
    assert cosines(got_first, alone).min() > 0.99999 and cosines(got_second, alone).min() > 0.99999


def test_a_lone_row_started_behind_a_running_batch_runs_on_a_lane_and_gets_its_vector(make_adapter: MakeAdapter,
                                                                                    minilm_dir: Path,
                                                                                    cache: Path) -> None:
    """A lone row the prepare thread starts while a batch runs queues as a lane call (not on the lone-row model
    beside the batch's streams), and its vector is the one it gets alone on idle lanes."""
    adapter = lean(make_adapter, minilm_dir, cache, "openvino", options={"onnx_lanes": 2})
    batch, lone = (adapter.prepare(EncodeBatch(batch_id=i, items=[InputItem(text=t) for t in texts],
                                               output_types=["dense"]))
                   for i, texts in ((1, TEXTS[:20]), (2, ["one lone sentence"])))
    runtime = adapter.lanes.runtime
    run, run_alone = runtime.run, runtime.run_alone
    release, lone_on_lane, alone_calls = threading.Event(), threading.Event(), []

    def gated(feed: dict[str, np.ndarray]) -> np.ndarray:
        if len(feed["input_ids"]) == 1 and feed["input_ids"].shape == lone.inputs[0][1]["input_ids"].shape:
            lone_on_lane.set()
        elif not release.is_set():
            assert release.wait(120)  # the batch's calls hold their lanes until the lone row has begun
        return run(feed)

    def recording_alone(feed: dict[str, np.ndarray]) -> np.ndarray:
        alone_calls.append(len(feed["input_ids"]))
        return run_alone(feed)

    runtime.run, runtime.run_alone = gated, recording_alone
    adapter.start(batch)
    adapter.start(lone)
    release.set()
    got_lone = adapter.forward(lone).dense.numpy()
    adapter.forward(batch)
    runtime.run, runtime.run_alone = run, run_alone
    assert lone_on_lane.is_set() and not alone_calls, "the lone row ran on a lane, not on the lone-row model"
    assert cosines(got_lone, encode(adapter, ["one lone sentence"], ["dense"]).dense.numpy()).min() > 0.99999


def test_an_unwritable_cache_exports_into_a_temporary_folder(make_adapter: MakeAdapter, minilm_dir: Path,
                                                             tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    adapter = lean(make_adapter, minilm_dir, blocker / "graphs")
    assert isinstance(adapter, LeanDenseAdapter) and adapter.graph.temporary
    assert not adapter.graph.folder.exists(), "the temporary export is removed once the runtime holds it"
    assert encode(adapter, ["hello"], ["dense"]).dense.numpy().shape == (1, 384)


def test_options_truncation_and_bad_input(make_adapter: MakeAdapter, minilm_dir: Path, cache: Path,
                                          reference_model: Any) -> None:
    adapter = lean(make_adapter, minilm_dir, cache, "onnx")
    raw = encode(adapter, TEXTS[:4], ["dense"], options={"normalize": False, "pooling": "cls"}).dense.numpy()
    hidden = reference_model[0].auto_model(**reference_model.tokenize(TEXTS[:4])).last_hidden_state
    np.testing.assert_allclose(raw, hidden[:, 0].detach().numpy(), atol=1e-4)
    long_text = " ".join(f"w{i}" for i in range(400))
    with pytest.raises(InputTooLong, match="over this model's maximum of 256"):
        encode(adapter, [long_text], ["dense"], options={"truncate": False})
    with pytest.raises(BadInput, match=r"options\.pooling: pooling mode 'median' is not computed"):
        encode(adapter, ["x"], ["dense"], options={"pooling": "median"})
    torch_adapter = make_adapter("dense", minilm_dir, threads=2)  # transformers' own truncation, left side
    assert isinstance(torch_adapter, DenseAdapter)
    left = {"truncation_direction": "left"}
    got = encode(adapter, [long_text], ["dense"], options=left).dense.numpy()
    assert cosines(got, encode(torch_adapter, [long_text], ["dense"], options=left).dense.numpy()).min() > 0.99999
    assert cosines(got, encode(adapter, [long_text], ["dense"]).dense.numpy()).min() < 0.99, "the other end was kept"


def test_micro_batches_are_capped_by_tokens_and_a_long_batch_leaves_no_high_water_mark(
        make_adapter: MakeAdapter, minilm_dir: Path, cache: Path) -> None:
    """A runtime keeps the working memory of the largest call it ran; calls are capped at 1024 padded tokens and
    the worker warms up at the cap, so a 64 x 256 batch adds nothing to what it held at Ready."""
    adapter = lean(make_adapter, minilm_dir, cache, max_sequence_length=256)
    before = psutil.Process().memory_info().rss
    batch = [f"word{i} " * 300 for i in range(64)]
    prepared = adapter.prepare(EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in batch],
                                           output_types=["dense"]))
    assert max(feed["input_ids"].size for _, feed in prepared.inputs) <= DenseOptions().micro_batch_tokens
    result = adapter.forward(prepared)
    assert max(result.token_counts) == 256, "the batch really was 64 x 256 tokens"
    grown = psutil.Process().memory_info().rss - before
    assert grown < 64 * 2**20, f"the process kept {grown / 2**20:.0f} MiB after one long batch"


def test_the_lean_tokenizer_tokenizes_and_decodes_as_transformers(minilm_dir: Path, cache: Path) -> None:
    """TEI's /tokenize and /decode on a lean worker give what they give on a torch one."""
    graph = graph_cache.ensure_graph(minilm_dir, cache)
    assert graph is not None

    class Holder:
        def __init__(self, tokenizer: Any) -> None:
            self.tokenizer = tokenizer

    hf = Holder(AutoTokenizer.from_pretrained(minilm_dir))
    mine = Holder(TextTokenizer(graph.tokenizer_path, graph.clean_up_tokenization_spaces))
    texts = ["Hello, world! Ünïcödé 数字 🙂 don't", "a " * 600]
    for add_special_tokens in (True, False):
        batch = TokenizeBatch(batch_id=1, texts=texts, add_special_tokens=add_special_tokens)
        assert tokens.answer(mine, batch) == tokens.answer(hf, batch)
    ids = hf.tokenizer("Hello, world! don't stop")["input_ids"]
    for skip in (True, False):
        batch = DecodeBatch(batch_id=1, ids=[ids], skip_special_tokens=skip)
        assert tokens.answer(mine, batch) == tokens.answer(hf, batch)
    with pytest.raises(BadInput, match="outside the vocabulary"):
        tokens.answer(mine, DecodeBatch(batch_id=1, ids=[[10**6]], skip_special_tokens=True))

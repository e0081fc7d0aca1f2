"""Dense embeddings on CPU without torch (worker process): a cached ONNX graph under OpenVINO or ONNX Runtime, the
Rust tokenizer, and pooling and normalisation in numpy.

Such a worker maps neither torch nor transformers: it holds about a third of the memory of a torch worker and starts
in well under a second once the graph is cached (bench/README.md, "lean workers"). The first load of a checkpoint
exports its graph in a helper process (graph_cache.ensure_graph); a checkpoint that cannot be exported, or whose graph
disagrees with torch, is served by the torch adapter instead (`build`, then `adapters.build_adapter`).

Engines (the `engine` option): `auto` (the default) takes OpenVINO where it is installed, else ONNX Runtime; `openvino`,
`onnx` ask for one; `torch` never comes here. OpenVINO computes in bfloat16 where the CPU has it
natively unless the model's precision is float32, checked on the cache's probe batch at every load.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from sie_worker.adapters import graph_cache, graph_runtime
from sie_worker.adapters.base import BadInput, LoadInfo, Prepared, UnsupportedTask, refuse_over_length
from sie_worker.adapters.batching import (
    CPU_CALL_OVERHEAD_TOKENS,
    MICRO_BATCH_ITEMS,
    Stopwatch,
    length_buckets,
    padded,
    split_for_lanes,
)
from sie_worker.adapters.st_config import dense_settings
from sie_worker.adapters.text_tokenizer import TextTokenizer
from sie_worker.protocol import DenseOptions, EncodeBatch, EncodeResult, Tensor, WorkerSpec

log = logging.getLogger("sie.worker")

POOLINGS = ("mean", "cls", "last", "last_token")
# Padded lengths are multiples of this. OpenVINO keeps compiled kernels and buffers for every input shape it has run:
# a MiniLM worker grew 239 -> 441 MiB over a mix of 300 batches padded to multiples of 8, -> 380 at 16, -> 329 at 32,
# -> 272 at 64, at the same throughput; a lone sentence was no slower at 32 (5.5 ms against 6.1 at 8).
PAD_MULTIPLE = 32


def runtime_for(spec: WorkerSpec) -> str | None:
    """The graph runtime a dense worker's spec asks for, or None when it runs torch (`engine: torch`, a GPU, a
    bfloat16 model without OpenVINO, or neither runtime installed)."""
    engine = spec.options_as(DenseOptions).engine
    if engine == "torch" or spec.device.startswith("cuda"):
        return None
    openvino = importlib.util.find_spec("openvino") is not None
    onnxruntime = importlib.util.find_spec("onnxruntime") is not None and spec.compute_precision != "bfloat16"
    if engine == "openvino" or (engine == "auto" and openvino):
        return "openvino" if openvino else None
    return "onnxruntime" if onnxruntime else None


def build(spec: WorkerSpec) -> LeanDenseAdapter | None:
    """The lean adapter for `spec` with its runtime open and checked, exporting the graph first if needed; None when
    torch must serve it (no graph to be had, or the runtime disagrees with torch on the probe batch)."""
    runtime = runtime_for(spec)
    if runtime is None:
        return None
    graph = graph_cache.ensure_graph(Path(spec.weights_dir), spec.options_as(DenseOptions).onnx_cache_dir)
    if graph is None:
        return None
    adapter = LeanDenseAdapter(spec, graph, runtime)
    try:
        adapter.open()
    except graph_runtime.GraphRejected as exc:
        log.warning("%s; serving %s with torch", exc, spec.model)
        return None
    return adapter


def pool(hidden: np.ndarray, mask: np.ndarray, how: str) -> np.ndarray:
    """[B, T, H] -> [B, H] in float32."""
    if how == "cls":
        return hidden[:, 0].astype(np.float32)
    if how in ("last", "last_token"):
        # Last non-padding token, whichever side the tokenizer pads on.
        last = (np.arange(mask.shape[1])[None, :] * mask).argmax(axis=1)
        return hidden[np.arange(hidden.shape[0]), last].astype(np.float32)
    weights = mask[..., None].astype(np.float32)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def normalized(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class LeanDenseAdapter:
    def __init__(self, spec: WorkerSpec, graph: graph_cache.Graph, runtime: str) -> None:
        self.spec, self.graph, self.runtime_kind = spec, graph, runtime
        self.options = spec.options_as(DenseOptions)
        settings = dense_settings(spec)
        self.max_length = int(settings.max_length or min(graph.model_max_length, 512))
        self.pooling, self.normalize = settings.pooling, settings.normalize
        self.dim = graph.hidden_size
        self.max_tokens = min(spec.max_batch_tokens, self.options.micro_batch_tokens)
        self.lanes: graph_runtime.Lanes | None = None

    def open(self) -> None:
        """Open the tokenizer and the runtime over the graph, and check it (GraphRejected when it disagrees with
        torch)."""
        self.tokenizer = TextTokenizer(self.graph.tokenizer_path, self.graph.clean_up_tokenization_spaces)
        threads = self.spec.threads or os.cpu_count() or 1
        lanes = max(1, min(self.options.onnx_lanes or self.default_lanes(threads), threads))
        precision = {"float32": "float32", "bfloat16": "bfloat16"}.get(self.spec.compute_precision or "", "auto")
        try:
            runtime = graph_runtime.open_runtime(self.runtime_kind, self.graph, threads=threads, lanes=lanes,
                                                 precision=precision, arena=self.options.onnx_arena)
        finally:
            if self.graph.temporary:
                shutil.rmtree(self.graph.folder.parent, ignore_errors=True)  # the runtime holds the graph in memory
        self.lanes = graph_runtime.Lanes(runtime)
        log.info("engine: %s, graph %s", runtime.describe(), self.graph.folder)

    def load(self) -> LoadInfo:
        if self.lanes is None:
            self.open()
        self.warm_up()
        return LoadInfo(dims={"dense": self.dim}, capabilities=["dense"], max_sequence_length=self.max_length,
                        engine="onnx" if self.runtime_kind == "onnxruntime" else "openvino")

    def default_lanes(self, threads: int) -> int:
        """ORT: one call per thread (a barrier per operator costs more than the lanes' split: bench/README.md,
        "lanes"). OpenVINO: one stream on every thread; a second stream doubles the working memory for ~9%."""
        return threads if self.runtime_kind == "onnxruntime" else 1

    def warm_up(self) -> None:
        """The largest call the token cap allows at the full length (unless the option `warm_up: small`), then a small
        one: the memory the worker reports at Ready is then its working set."""
        rows = max(1, min(MICRO_BATCH_ITEMS, self.max_tokens // self.max_length))
        full = self.options.warm_up != "small"
        for shape in [*([(rows, self.max_length)] if full else []), (1, min(PAD_MULTIPLE, self.max_length))]:
            ids = np.full(shape, self.graph.pad_token_id, dtype=np.int64)
            self.run([self.feed(ids, np.ones_like(ids), np.zeros_like(ids))])

    def feed(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> dict[str, np.ndarray]:
        every = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: every[name] for name in self.graph.input_names}

    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        assert self.lanes is not None, "load() first"
        return self.lanes.run_all(feeds)

    def prepare(self, batch: Any) -> Prepared:
        """Tokenise without padding, then pad each length bucket on its own."""
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        clock = Stopwatch()
        truncate = batch.options.get("truncate", True) is not False
        side = str(batch.options.get("truncation_direction", "right"))
        encodings = self.tokenizer.encode_batch([item.text or "" for item in batch.items],
                                                self.max_length if truncate else None, side)
        counts = [len(encoding.ids) for encoding in encodings]
        if not truncate:
            refuse_over_length(counts, self.max_length)
        buckets = []
        for indices in length_buckets(counts, MICRO_BATCH_ITEMS, self.max_tokens, CPU_CALL_OVERHEAD_TOKENS,
                                      PAD_MULTIPLE):
            shape = (len(indices), min(self.max_length, padded(max(1, max(counts[i] for i in indices)), PAD_MULTIPLE)))
            ids = np.full(shape, self.graph.pad_token_id, dtype=np.int64)
            mask, types = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
            for row, i in enumerate(indices):
                encoding, n = encodings[i], counts[i]
                ids[row, :n], mask[row, :n], types[row, :n] = encoding.ids, 1, encoding.type_ids
            buckets.append((indices, self.feed(ids, mask, types)))
        return Prepared(batch=batch, inputs=buckets, token_counts=counts, tokenize_ms=clock.ms())

    def forward(self, prepared: Prepared) -> EncodeResult:
        batch = prepared.batch
        assert isinstance(batch, EncodeBatch)
        pooling = str(batch.options.get("pooling", self.pooling))
        if pooling not in POOLINGS:
            raise BadInput(f"options.pooling must be mean, cls, last or last_token, not {pooling!r}")
        normalize = bool(batch.options.get("normalize", self.normalize))
        assert self.lanes is not None
        buckets = split_for_lanes(prepared.inputs, self.lanes.runtime.lanes)
        out = np.empty((len(batch.items), self.dim), dtype=np.float32)
        for (indices, feed), hidden in zip(buckets, self.run([feed for _, feed in buckets]), strict=True):
            vectors = pool(hidden, feed["attention_mask"], pooling)
            out[indices] = normalized(vectors) if normalize else vectors
        return EncodeResult(token_counts=prepared.token_counts, dense=Tensor.from_numpy(out))

    def memory_bytes(self) -> int:
        return int(psutil.Process(os.getpid()).memory_info().rss)

    def close(self) -> None:
        if self.lanes is not None:
            self.lanes.close()
        self.lanes = None

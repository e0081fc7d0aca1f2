"""The one engine seam of the lean workers (worker process, free of torch): which graph runtimes a spec may run on,
the fallback over them, and `GraphSession`, what every lean family shares once its graph is open (the Rust
tokenizer, the runtime behind `Lanes`, padding length buckets into feeds, the warm-up).

A family is a tokenizer (single texts or pairs), a graph (`graph_cache` head kinds) and a numpy step after it. Its
`build(spec)` returns a lean adapter, or None for torch to serve it: a GPU, `engine: torch`, no runtime installed,
custom code, an export that fails. Any failure of a runtime to open the graph (a compile error, a corrupt IR, an
unsupported operator, a disagreement with torch on the probe batch) hands it to the next runtime, OpenVINO then ONNX
Runtime then torch, with one warning line naming the reason; a load that torch would serve never fails here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
from tokenizers import Encoding

from sie_worker.adapters import graph_cache, graph_runtime
from sie_worker.adapters.batching import (
    CPU_CALL_OVERHEAD_TOKENS,
    MICRO_BATCH_ITEMS,
    PAD_MULTIPLE,
    Bucket,
    length_buckets,
    padded,
)
from sie_worker.adapters.text_tokenizer import TextTokenizer
from sie_worker.protocol import GraphEngineOptions, RunEngine, WorkerSpec

log = logging.getLogger("sie.worker")

# The maximum length when neither the model config nor the checkpoint's files limit it.
FALLBACK_MAX_LENGTH = 512
# Padded lengths are multiples of batching.PAD_MULTIPLE (8): a corpus sentence of 38 tokens computes as 40, not 64
# (real tokens 92% of those computed, against 73% at 32). OpenVINO keeps executors and buffers for every input shape it
# has run, which grew a MiniLM worker 239 -> 441 MiB over a mix of 300 batches padded to multiples of 8 (-> 329 at 32);
# that cache is now bounded (graph_runtime.SHAPE_CACHE_CAPACITY), so the multiple no longer bounds the memory
# (bench/README.md, "dense at the compute limit").
# A batch of one row (one sentence at concurrency 1) pads to a multiple of this instead: it runs on the lone-row model,
# whose shape cache is then at most 8 shapes for 256 tokens, and costs no more (5.5 ms at 32 against 6.1 at 8).
PAD_ALONE = 32


class Openable(Protocol):
    def open(self) -> None: ...


AdapterT = TypeVar("AdapterT", bound=Openable)


def runtimes_for(spec: WorkerSpec) -> list[str]:
    """The graph runtimes a spec may run on, in the order tried; none when it runs torch (`engine: torch`, a GPU, a
    family without engine options, or no runtime installed). ONNX Runtime computes in float32 only, so it does not
    serve a model asked to run in bfloat16."""
    if not isinstance(spec.options, GraphEngineOptions) and spec.options is not None:
        return []
    engine = spec.options.engine if spec.options is not None else GraphEngineOptions().engine
    if engine == "torch" or spec.device.startswith("cuda"):
        return []
    installed = [name for name in ("openvino", "onnxruntime") if importlib.util.find_spec(name) is not None]
    if spec.compute_precision == "bfloat16":
        installed = [name for name in installed if name != "onnxruntime"]
    return [name for name in installed if engine != "onnx" or name == "onnxruntime"]


def engine_options(spec: WorkerSpec) -> GraphEngineOptions:
    return spec.options if isinstance(spec.options, GraphEngineOptions) else GraphEngineOptions()


def reason(exc: BaseException) -> str:
    """An engine's error on one line: OpenVINO's begins with lines naming its own source files, then says why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = " ".join(line for line in lines if not line.startswith("Exception from")) or type(exc).__name__
    return said if len(said) <= 300 else said[:297] + "..."


def first_that_opens(spec: WorkerSpec, runtimes: Sequence[str], graph: graph_cache.Graph,
                     make: Callable[[graph_cache.Graph, str], AdapterT]) -> AdapterT | None:
    """`make(graph, runtime)` opened on the first runtime that can serve the graph, else None (torch serves it)."""
    try:
        for runtime, after in zip(runtimes, [*runtimes[1:], "torch"], strict=True):
            try:
                adapter = make(graph, runtime)
                adapter.open()
                return adapter
            except MemoryError:
                raise
            except Exception as exc:  # any failure to compile or to agree with torch hands the graph on
                log.warning("%s cannot serve %s (%s); serving it with %s", runtime, spec.model, reason(exc), after)
        return None
    finally:
        if graph.temporary:
            shutil.rmtree(graph.folder.parent, ignore_errors=True)  # an open runtime holds the graph in memory


def build_lean(spec: WorkerSpec, weights_dir: Path, head: str,
               make: Callable[[graph_cache.Graph, str], AdapterT]) -> AdapterT | None:
    """The family's lean adapter over the graph of `head`, exported first if needed; None when torch must serve it."""
    runtimes = runtimes_for(spec)
    if not runtimes:
        return None
    graph = graph_cache.ensure_graph(weights_dir, engine_options(spec).onnx_cache_dir, head)
    if graph is None:
        return None
    return first_that_opens(spec, runtimes, graph, make)


def run_engine(runtime_kind: str) -> RunEngine:
    return "onnx" if runtime_kind == "onnxruntime" else "openvino"


def default_lanes(runtime_kind: str, threads: int) -> int:
    """ORT: one call per thread (a barrier per operator costs more than the lanes' split: bench/README.md, "lanes").
    OpenVINO: two streams of threads // 2 (a lone row runs alone on every thread): 20-50% more sentences per CPU
    second on batches of 32 and 256 for about 120 MiB (bench/README.md, "dense at the compute limit")."""
    return threads if runtime_kind == "onnxruntime" else min(2, threads)


def open_lanes(spec: WorkerSpec, graph: graph_cache.Graph, runtime_kind: str) -> graph_runtime.Lanes:
    """The runtime over the graph, checked on its probe batches (GraphRejected), with the spec's threads, lanes and
    precision."""
    options = engine_options(spec)
    threads = spec.threads or os.cpu_count() or 1
    lanes = max(1, min(options.onnx_lanes or default_lanes(runtime_kind, threads), threads))
    precision = {"float32": "float32", "bfloat16": "bfloat16"}.get(spec.compute_precision or "", "auto")
    runtime = graph_runtime.open_runtime(runtime_kind, graph, threads=threads, lanes=lanes, precision=precision,
                                         arena=options.onnx_arena)
    log.info("engine: %s, graph %s (head %s)", runtime.describe(), graph.folder, graph.head)
    return graph_runtime.Lanes(runtime)


def computes(lanes: graph_runtime.Lanes) -> str:
    """What an open runtime computes in: OpenVINO's choice under `auto` (bf16 where the CPU has it natively)."""
    said = lanes.runtime.computes()
    return {"bf16": "bfloat16", "f32": "float32", "f16": "float16"}.get(said, said)


class GraphSession:
    """An open graph with its tokenizer and runtime: what a lean family's adapter composes."""

    def __init__(self, spec: WorkerSpec, graph: graph_cache.Graph, runtime_kind: str, max_length: int | None,
                 lowercase: bool = False) -> None:
        self.spec, self.graph, self.runtime_kind = spec, graph, runtime_kind
        self.options = engine_options(spec)
        self.max_length = int(max_length or min(graph.model_max_length, FALLBACK_MAX_LENGTH))
        self.max_tokens = min(spec.max_batch_tokens, self.options.micro_batch_tokens)
        self.lowercase = lowercase
        self.lanes: graph_runtime.Lanes | None = None

    @property
    def engine(self) -> RunEngine:
        return run_engine(self.runtime_kind)

    @property
    def precision(self) -> str:
        """What the open runtime computes in: OpenVINO's choice under `auto` (bf16 where the CPU has it natively)."""
        assert self.lanes is not None, "open() first"
        return computes(self.lanes)

    def open(self) -> None:
        """Open the tokenizer and the runtime over the graph, checked on the probe batch (GraphRejected)."""
        self.tokenizer = TextTokenizer(self.graph.tokenizer_path, self.graph.clean_up_tokenization_spaces,
                                       lowercase=self.lowercase)
        self.lanes = open_lanes(self.spec, self.graph, self.runtime_kind)
        lanes = self.lanes.runtime.lanes
        if self.runtime_kind == "openvino":
            # Each stream keeps the working memory of the largest call it has run, so the streams share the token cap:
            # two streams of 512 tokens a call hold what one of 1024 did (a worker after a mixed-length soak: 461
            # MiB against 537), for 0-3% of throughput on batches of 32 and 256 (bench/README.md).
            self.max_tokens = max(PAD_ALONE, self.max_tokens // lanes)

    def feed(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> dict[str, np.ndarray]:
        every = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: every[name] for name in self.graph.input_names}

    def buckets(self, encodings: list[Encoding], max_items: int | None = None) -> list[Bucket]:
        """The encodings in length buckets, each padded on its own to a multiple of PAD_MULTIPLE (PAD_ALONE for a
        lone row)."""
        counts = [len(encoding.ids) for encoding in encodings]
        multiple = PAD_ALONE if len(counts) == 1 else PAD_MULTIPLE
        out: list[Bucket] = []
        for indices in length_buckets(counts, max_items or MICRO_BATCH_ITEMS, self.max_tokens, CPU_CALL_OVERHEAD_TOKENS,
                                      multiple):
            longest = max(1, max(counts[i] for i in indices))
            shape = (len(indices), max(longest, min(self.max_length, padded(longest, multiple))))
            ids = np.full(shape, self.graph.pad_token_id, dtype=np.int64)
            mask, types = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
            for row, i in enumerate(indices):
                encoding, n = encodings[i], counts[i]
                ids[row, :n], mask[row, :n], types[row, :n] = encoding.ids, 1, encoding.type_ids
            out.append((indices, self.feed(ids, mask, types)))
        return out

    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        assert self.lanes is not None, "open() first"
        return self.lanes.run_all(feeds)

    def warm_up(self) -> None:
        """The largest call the token cap allows at the full length (unless the option `warm_up: small`), then a small
        one: the memory the worker reports at Ready is then its working set. With several lanes the largest call runs
        on each stream, and a lone row of the full length alone (split_for_lanes shares out any bucket of two rows)."""
        assert self.lanes is not None, "open() first"
        length = min(self.max_length, self.max_tokens)  # a longer text runs alone, in a call of its own
        rows = max(1, min(MICRO_BATCH_ITEMS, self.max_tokens // length))
        lanes = self.lanes.runtime.lanes
        full = self.options.warm_up != "small"
        calls = [(rows, length, lanes), *([(1, length, 1)] if lanes > 1 else [])] if full else []
        for rows, length, count in [*calls, (1, min(PAD_ALONE, self.max_length), 1)]:
            ids = np.full((rows, length), self.graph.pad_token_id, dtype=np.int64)
            self.run([self.feed(ids, np.ones_like(ids), np.zeros_like(ids))] * count)

    def close(self) -> None:
        if self.lanes is not None:
            self.lanes.close()
        self.lanes = None

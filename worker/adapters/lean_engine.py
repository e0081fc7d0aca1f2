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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import psutil
from tokenizers import Encoding

from sie_worker.adapters import graph_cache, graph_runtime
from sie_worker.adapters.base import LoadInfo, Prepared, refuse_over_length, truncates
from sie_worker.adapters.batching import (
    CPU_CALL_OVERHEAD_TOKENS,
    MICRO_BATCH_ITEMS,
    PAD_MULTIPLE,
    Bucket,
    Stopwatch,
    length_buckets,
    padded,
    split_for_lanes,
)
from sie_worker.adapters.text_tokenizer import TextTokenizer
from sie_worker.options import GraphEngineOptions
from sie_worker.protocol import EncodeBatch, RunEngine, WorkerSpec

log = logging.getLogger("sie.worker")

# The maximum length when neither the model config nor the checkpoint's files limit it.
FALLBACK_MAX_LENGTH = 512
# The streams' calls pad to multiples of batching.PAD_MULTIPLE (8): a corpus sentence of 38 tokens computes as 40 (real
# tokens 91% of those computed over a batch of 256, against 73% at 32). OpenVINO's stream model keeps few shapes
# (graph_runtime.SHAPE_CACHE_CAPACITY), but the process still grows with the shapes it has run: at multiples of 4 (96%
# real) the server tree after `make bench` held 515 MiB PSS against 423-432 at 8, for +2-5% on batches of 256 and
# nothing at b32c4 (bench/README.md, "dense at the compute limit").
# A packed graph's calls (packed_feed) pad only attention's rows, as its linear layers compute the real tokens alone:
# to multiples of 16, half the shapes of 8 for the same speed (`bench/levers.py packedpad=8 packedpad=16
# packedpad=32`: 381.5 sentences/s at 8 and at 16 on batches of 256, 336.9 and 342.9 on 32; 32 is 2-3% slower).
PACKED_PAD_MULTIPLE = 16
# A batch of one row (one sentence at concurrency 1) pads to a multiple of this: it runs on the lone-row model, whose
# shape cache (OpenVINO's default) then holds at most max_length / 8 shapes of one row (behind busy lanes, on a stream
# instead, whose cache is capped: graph_runtime.Lanes). A corpus sentence alone computed
# as 64 tokens at 32: c1's p50 went 7.5 -> 5.9 ms at 8 through the server, and the tree's PSS 423 -> 432 MiB.
PAD_ALONE = 8
# The fewest inputs a tokenising thread takes when a batch is split over threads (tokenize_parts): a corpus sentence
# takes about 60 us on one thread, so a part of 8 outweighs handing it to another thread.
SPLIT_TOKENIZE_ITEMS = 8
# The warm-up's first call: one row of this many tokens, which also measures the runtime's pace.
WARM_UP_FIRST_TOKENS = 32
# Deadlines of the warm-up's calls: the first (one row of WARM_UP_FIRST_TOKENS) gets this long; a later call this long
# or HUNG_FACTOR times what its tokens take at the first call's pace, whichever is longer. A call past its deadline is a
# hung runtime (graph_runtime.RuntimeHung), and the next runtime serves the model instead.
WARM_UP_FLOOR_S = 60.0
HUNG_FACTOR = 50
# Where `LeanAdapter.start` leaves a prepared batch's begun calls for its forward.
_STARTED = "started"
# Buckets split for the lanes, and what waits for their outputs.
StartedBuckets = tuple[list[Bucket], Callable[[], list[np.ndarray]]]


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


def tokenize_parts(count: int, threads: int, lanes_idle: bool) -> int:
    """How many threads tokenise a batch of `count` inputs: all `threads` while the lanes are idle (the batch waits
    for its tokens, and nothing else wants the cores), one while calls run, so that the tokens take from those calls
    no more than they cost. A part has at least SPLIT_TOKENIZE_ITEMS inputs."""
    return max(1, min(threads, count // SPLIT_TOKENIZE_ITEMS)) if lanes_idle else 1


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


def worker_threads(spec: WorkerSpec) -> int:
    """The threads a worker computes on: the spec's, or every CPU. The runtime and the tokenizer's helpers share it."""
    return spec.threads or os.cpu_count() or 1


def open_lanes(spec: WorkerSpec, graph: graph_cache.Graph, runtime_kind: str) -> graph_runtime.Lanes:
    """The runtime over the graph, checked on its probe batches (GraphRejected), with the spec's threads, lanes and
    precision."""
    options = engine_options(spec)
    threads = worker_threads(spec)
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
        # Other sessions of the same worker whose calls share these cores (CLIP's image tower): `lanes_idle` asks them
        # too.
        self.neighbours: list[Any] = []

    @property
    def engine(self) -> RunEngine:
        return run_engine(self.runtime_kind)

    @property
    def precision(self) -> str:
        """What the open runtime computes in: OpenVINO's choice under `auto` (bf16 where the CPU has it natively)."""
        assert self.lanes is not None, "open() first"
        return computes(self.lanes)

    def open(self) -> None:
        """Open the tokenizer and the runtime over the graph, checked on the probe batch (GraphRejected), and warm it
        up (RuntimeHung): `first_that_opens` hands a runtime that fails either to the next."""
        self.tokenizer = TextTokenizer(self.graph.tokenizer_path, self.graph.clean_up_tokenization_spaces,
                                       lowercase=self.lowercase, threads=worker_threads(self.spec))
        self.lanes = open_lanes(self.spec, self.graph, self.runtime_kind)
        lanes = self.lanes.runtime.lanes
        if self.runtime_kind == "openvino":
            # Each stream keeps the working memory of the largest call it has run, so the streams share the token cap:
            # two streams of 512 tokens a call hold what one of 1024 did (a worker after a mixed-length soak: 461
            # MiB against 537), for 0-3% of throughput on batches of 32 and 256 (bench/README.md).
            self.max_tokens = max(WARM_UP_FIRST_TOKENS, self.max_tokens // lanes)
        self.warm_up()

    def feed(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> dict[str, np.ndarray]:
        every = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: every[name] for name in self.graph.input_names}

    def buckets(self, encodings: list[Encoding], max_items: int | None = None) -> list[Bucket]:
        """The encodings in length buckets, each padded on its own to a multiple of PAD_MULTIPLE (PACKED_PAD_MULTIPLE
        for a packed graph, PAD_ALONE for a lone row)."""
        counts = [len(encoding.ids) for encoding in encodings]
        multiple = PAD_ALONE if len(counts) == 1 else PACKED_PAD_MULTIPLE if self.graph.packed else PAD_MULTIPLE
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

    def tokenize(self, texts: list[str] | list[tuple[str, str]], options: dict[str, Any]) -> list[Encoding]:
        """Texts, or (query, document) pairs, tokenised and cut at max_length from the side `truncation_direction`
        names (pairs longest first); InputTooLong instead, stating the length, where `base.truncates` is false."""
        truncate = truncates(options)
        side = str(options.get("truncation_direction", "right"))
        max_length = self.max_length if truncate else None
        parts = tokenize_parts(len(texts), self.tokenizer.threads, self.lanes_idle())
        if texts and isinstance(texts[0], tuple):
            encodings = self.tokenizer.encode_pairs(texts, max_length, side, offsets=False,  # type: ignore[arg-type]
                                                    parts=parts)
        else:
            encodings = self.tokenizer.encode_batch(texts, max_length, side, offsets=False,  # type: ignore[arg-type]
                                                    parts=parts)
        if not truncate:
            refuse_over_length([len(encoding.ids) for encoding in encodings], self.max_length)
        return encodings

    def lanes_idle(self) -> bool:
        """No call of this session's lanes, or of its neighbours', started and unfinished."""
        return all(session.lanes is not None and session.lanes.idle for session in (self, *self.neighbours))

    def prepare_texts(self, batch: EncodeBatch) -> Prepared:
        """The `prepare` step of a plain text encoder: its items' texts tokenised (`tokenize`), in length buckets."""
        clock = Stopwatch()
        encodings = self.tokenize([item.text or "" for item in batch.items], batch.options)
        return Prepared(batch=batch, inputs=self.buckets(encodings), token_counts=[len(e.ids) for e in encodings],
                        tokenize_ms=clock.ms())

    def start(self, buckets: list[Bucket]) -> StartedBuckets:
        """The buckets split so that every lane has work (`split_for_lanes`), their calls begun now on the lanes
        (`Lanes.start`): calling the second element waits for their outputs, in order."""
        assert self.lanes is not None, "open() first"
        split = split_for_lanes(buckets, self.lanes.runtime.lanes)
        return split, self.lanes.start([feed for _, feed in split])

    def warm_up(self) -> None:
        """A small call, then the largest call the token cap allows at the full length on each stream (unless the
        option `warm_up: small`) and a lone row of the full length on the lone-row model: the memory the worker
        reports at Ready is then its working set.

        The calls run one at a time, and each has a deadline. A load once hung on CI after its OpenVINO runtime
        opened, in this warm-up, which then ran the largest call on both streams side by side: the worker never said
        Ready, and the router killed it at its 600 s load timeout. Every infer request specialises itself on its first
        call of a shape, and requests doing that side by side on one new shape is the suspect (ultralytics#25923 saw
        such hangs on low-core AMD EPYC runners). It never recurred here under stress, so the cause is not proven,
        and a runtime whose call passes its deadline is handed on to the next runtime, as one that fails is."""
        assert self.lanes is not None, "open() first"
        runtime = self.lanes.runtime
        small = min(WARM_UP_FIRST_TOKENS, self.max_length)
        started = time.monotonic()
        graph_runtime.within(WARM_UP_FLOOR_S, f"{runtime.describe()}'s first call (1 x {small} tokens)",
                             runtime.run_alone, self._pad_feed(1, small), thread="sie-warm-up")
        seconds_per_token = (time.monotonic() - started) / small
        if self.options.warm_up == "small":
            return
        length = min(self.max_length, self.max_tokens)  # a longer text runs alone, in a call of its own
        rows = max(1, min(MICRO_BATCH_ITEMS, self.max_tokens // length))
        calls = [(runtime.run, rows)] * runtime.lanes + ([(runtime.run_alone, 1)] if runtime.lanes > 1 else [])
        for run, count in calls:
            deadline = max(WARM_UP_FLOOR_S, HUNG_FACTOR * seconds_per_token * count * length)
            graph_runtime.within(deadline, f"{runtime.describe()}'s warm-up call ({count} x {length} tokens)", run,
                                 self._pad_feed(count, length), thread="sie-warm-up")
        graph_runtime.trim_heap()

    def _pad_feed(self, rows: int, length: int) -> dict[str, np.ndarray]:
        ids = np.full((rows, length), self.graph.pad_token_id, dtype=np.int64)
        return self.feed(ids, np.ones_like(ids), np.zeros_like(ids))

    def close(self) -> None:
        if self.lanes is not None:
            self.lanes.close()
        self.lanes = None
        if hasattr(self, "tokenizer"):  # open() makes it
            self.tokenizer.close()


class LeanAdapter:
    """What every lean family's adapter shares: its GraphSession, opened once (checked, warmed up, and handed to the
    next runtime on any failure by `first_that_opens`), the LoadInfo it reports, the process's memory and closing. A
    family names its `capabilities` and `dims()`, and runs steps of its own in `open()` around `super().open()`."""

    session: GraphSession
    capabilities: ClassVar[tuple[str, ...]]

    def open(self) -> None:
        self.session.open()

    def start(self, prepared: Prepared) -> None:
        """Begin a prepared batch's forward calls now (`base.StartsEarly`): the worker's prepare thread does, while
        the batch before it runs, so a lane done with that batch's calls goes straight on to this one's."""
        prepared.extra[_STARTED] = self.session.start(prepared.inputs)

    def bucket_outputs(self, prepared: Prepared) -> list[tuple[Bucket, np.ndarray]]:
        """Each of the batch's buckets (split for the lanes) with the graph's output for it, from the calls `start`
        began (begun here if it was not called)."""
        buckets, outputs = prepared.extra.pop(_STARTED, None) or self.session.start(prepared.inputs)
        return list(zip(buckets, outputs(), strict=True))

    def dims(self) -> dict[str, int]:
        return {}

    def load(self) -> LoadInfo:
        if self.session.lanes is None:
            self.open()
        return LoadInfo(dims=self.dims(), capabilities=list(self.capabilities),
                        max_sequence_length=self.session.max_length, engine=self.session.engine,
                        precision=self.session.precision)

    def memory_bytes(self) -> int:
        return int(psutil.Process(os.getpid()).memory_info().rss)

    def close(self) -> None:
        self.session.close()

"""Dense embeddings on CPU without torch (worker process): a cached ONNX graph of the encoder under OpenVINO or ONNX
Runtime, the Rust tokenizer, and the checkpoint's sentence-transformers steps (Pooling, Dense, Normalize) in numpy.

Such a worker maps neither torch nor transformers: it holds about a third of the memory of a torch worker and starts
in well under a second once the graph is cached (bench/README.md, "lean workers"). The first load of a checkpoint
exports its graph in a helper process (graph_cache.ensure_graph); a checkpoint that cannot be exported, or whose graph
no runtime compiles or agrees with torch on, is served by the torch adapter instead (`build`, then
`adapters.build_adapter`).

Engines (the `engine` option): `auto` (the default) tries OpenVINO, then ONNX Runtime; `openvino` the same; `onnx`
ONNX Runtime alone; `torch` never comes here. OpenVINO computes in bfloat16 where the CPU has it
natively unless the model's precision is float32, checked on the cache's probe batches once per cache entry.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from sie_worker.adapters import graph_cache, graph_runtime, lean_engine
from sie_worker.adapters.base import LoadInfo, Prepared, UnsupportedTask, refuse_over_length
from sie_worker.adapters.batching import (
    CPU_CALL_OVERHEAD_TOKENS,
    MICRO_BATCH_ITEMS,
    Stopwatch,
    length_buckets,
    padded,
    split_for_lanes,
)
from sie_worker.adapters.st_config import DenseSettings, dense_settings
from sie_worker.adapters.st_head import Head, WeightsNeedTorch
from sie_worker.adapters.text_tokenizer import TextTokenizer
from sie_worker.protocol import DenseOptions, EncodeBatch, EncodeResult, Tensor, WorkerSpec
from sie_worker.st_layout import read_layout
from sie_worker.st_pipeline import Pipeline

log = logging.getLogger("sie.worker")

# The maximum length when neither the model config nor the checkpoint's files limit it.
FALLBACK_MAX_LENGTH = 512
# Padded lengths are multiples of this: a corpus sentence of 38 tokens computes as 40, not 64 (real tokens 92% of those
# computed, against 73% at 32). OpenVINO keeps executors and buffers for every input shape it has run, which grew a
# MiniLM worker 239 -> 441 MiB over a mix of 300 batches padded to multiples of 8 (-> 329 at 32); that cache is now
# bounded (graph_runtime.SHAPE_CACHE_CAPACITY), so the multiple no longer bounds the memory.
PAD_MULTIPLE = 8
# A batch of one row (one sentence at concurrency 1) pads to a multiple of this instead: it runs on the lone-row model,
# whose shape cache is then at most 8 shapes for 256 tokens, and costs no more (5.5 ms at 32 against 6.1 at 8).
PAD_ALONE = 32


# The runtimes a spec may run on: one rule for every lean family (lean_engine).
runtimes_for = lean_engine.runtimes_for


def build(spec: WorkerSpec) -> LeanDenseAdapter | None:
    """The lean adapter for `spec` with a runtime open and checked, exporting the graph first if needed; None when
    torch must serve it. A runtime that cannot serve the graph (a compile error, a disagreement with torch on the
    probe batch) hands it to the next, OpenVINO then ONNX Runtime then torch, with one warning line saying why.
    A checkpoint whose steps no engine computes fails here (st_pipeline.Unsupported), before any export."""
    if not runtimes_for(spec):
        return None
    settings = dense_settings(spec)
    if settings.custom_code:
        return None  # custom code runs on torch, where it is trusted (adapters.build_adapter)
    try:
        head = Head(settings.pipeline)
    except WeightsNeedTorch as exc:
        log.warning("%s; serving %s with torch", exc, spec.model)
        return None
    encoder = read_layout(Path(spec.weights_dir)).encoder_folder
    return lean_engine.build_lean(spec, encoder, graph_cache.HIDDEN,
                                  lambda graph, runtime: LeanDenseAdapter(spec, graph, runtime, settings, head))


class LeanDenseAdapter:
    def __init__(self, spec: WorkerSpec, graph: graph_cache.Graph, runtime: str, settings: DenseSettings,
                 head: Head) -> None:
        self.spec, self.graph, self.runtime_kind = spec, graph, runtime
        self.options = spec.options_as(DenseOptions)
        self.settings, self.head = settings, head
        self.max_length = int(settings.max_length or min(graph.model_max_length, FALLBACK_MAX_LENGTH))
        self.dim = settings.pipeline.dim(graph.hidden_size)
        self.prompt_lengths: dict[str, int] = {}
        self.max_tokens = min(spec.max_batch_tokens, self.options.micro_batch_tokens)
        self.lanes: graph_runtime.Lanes | None = None

    def open(self) -> None:
        """Open the tokenizer and the runtime over the graph, and check it (GraphRejected when it disagrees with
        torch)."""
        self.tokenizer = TextTokenizer(self.graph.tokenizer_path, self.graph.clean_up_tokenization_spaces,
                                       lowercase=self.settings.pipeline.do_lower_case)
        threads = self.spec.threads or os.cpu_count() or 1
        lanes = max(1, min(self.options.onnx_lanes or self.default_lanes(threads), threads))
        precision = {"float32": "float32", "bfloat16": "bfloat16"}.get(self.spec.compute_precision or "", "auto")
        runtime = graph_runtime.open_runtime(self.runtime_kind, self.graph, threads=threads, lanes=lanes,
                                             precision=precision, arena=self.options.onnx_arena)
        self.lanes = graph_runtime.Lanes(runtime)
        if self.runtime_kind == "openvino":
            # Each stream keeps the working memory of the largest call it has run, so the streams share the token cap:
            # two streams of 512 tokens a call hold what one of 1024 did (a worker after a mixed-length soak: 461
            # MiB against 537), for 0-3% of throughput on batches of 32 and 256 (bench/README.md).
            self.max_tokens = max(PAD_ALONE, self.max_tokens // lanes)
        log.info("engine: %s, graph %s", runtime.describe(), self.graph.folder)

    def load(self) -> LoadInfo:
        if self.lanes is None:
            self.open()
        self.warm_up()
        return LoadInfo(dims={"dense": self.dim}, capabilities=["dense"], max_sequence_length=self.max_length,
                        engine="onnx" if self.runtime_kind == "onnxruntime" else "openvino")

    def default_lanes(self, threads: int) -> int:
        """ORT: one call per thread (a barrier per operator costs more than the lanes' split: bench/README.md,
        "lanes"). OpenVINO: two streams of threads // 2 (a lone row runs alone on every thread): 20-50% more sentences
        per CPU second on batches of 32 and 256 for about 120 MiB (bench/README.md, "dense at the compute limit")."""
        return threads if self.runtime_kind == "onnxruntime" else min(2, threads)

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
        for rows, length, count in [*calls, (1, min(PAD_MULTIPLE, self.max_length), 1)]:
            ids = np.full((rows, length), self.graph.pad_token_id, dtype=np.int64)
            self.run([self.feed(ids, np.ones_like(ids), np.zeros_like(ids))] * count)

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
        pipeline = self.settings.batch_pipeline(batch.options)
        prompt = self.settings.batch_prompt(batch.options, batch.is_query)
        truncate = batch.options.get("truncate", True) is not False
        side = str(batch.options.get("truncation_direction", "right"))
        encodings = self.tokenizer.encode_batch([prompt + (item.text or "") for item in batch.items],
                                                self.max_length if truncate else None, side)
        counts = [len(encoding.ids) for encoding in encodings]
        if not truncate:
            refuse_over_length(counts, self.max_length)
        buckets = []
        multiple = PAD_ALONE if len(counts) == 1 else PAD_MULTIPLE
        for indices in length_buckets(counts, MICRO_BATCH_ITEMS, self.max_tokens, CPU_CALL_OVERHEAD_TOKENS, multiple):
            shape = (len(indices), min(self.max_length, padded(max(1, max(counts[i] for i in indices)), multiple)))
            ids = np.full(shape, self.graph.pad_token_id, dtype=np.int64)
            mask, types = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
            for row, i in enumerate(indices):
                encoding, n = encodings[i], counts[i]
                ids[row, :n], mask[row, :n], types[row, :n] = encoding.ids, 1, encoding.type_ids
            buckets.append((indices, self.feed(ids, mask, types)))
        return Prepared(batch=batch, inputs=buckets, token_counts=counts, tokenize_ms=clock.ms(),
                        extra={"pipeline": pipeline, "prompt_length": self.prompt_length(prompt, pipeline)})

    def prompt_length(self, prompt: str, pipeline: Pipeline) -> int:
        """The prompt's tokens to leave out of pooling (Pooling's `include_prompt: false`), else 0."""
        if not prompt or pipeline.pooling.include_prompt:
            return 0
        if prompt not in self.prompt_lengths:
            self.prompt_lengths[prompt] = self.tokenizer.prompt_length(prompt)
        return self.prompt_lengths[prompt]

    def forward(self, prepared: Prepared) -> EncodeResult:
        batch = prepared.batch
        assert isinstance(batch, EncodeBatch)
        pipeline, prompt_length = prepared.extra["pipeline"], prepared.extra["prompt_length"]
        assert self.lanes is not None
        buckets = split_for_lanes(prepared.inputs, self.lanes.runtime.lanes)
        out = np.empty((len(batch.items), self.dim), dtype=np.float32)
        for (indices, feed), hidden in zip(buckets, self.run([feed for _, feed in buckets]), strict=True):
            out[indices] = self.head(hidden, feed["attention_mask"], prompt_length, pipeline)
        return EncodeResult(token_counts=prepared.token_counts, dense=Tensor.from_numpy(out))

    def memory_bytes(self) -> int:
        return int(psutil.Process(os.getpid()).memory_info().rss)

    def close(self) -> None:
        if self.lanes is not None:
            self.lanes.close()
        self.lanes = None

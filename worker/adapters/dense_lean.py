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
from pathlib import Path
from typing import Any

import numpy as np

from sie_worker.adapters import graph_cache, graph_runtime, lean_engine
from sie_worker.adapters.base import Prepared, UnsupportedTask
from sie_worker.adapters.batching import Stopwatch
from sie_worker.adapters.st_config import DenseSettings, dense_settings
from sie_worker.adapters.st_head import Head, WeightsNeedTorch
from sie_worker.adapters.text_tokenizer import TextTokenizer
from sie_worker.protocol import EncodeBatch, EncodeResult, Tensor, WorkerSpec
from sie_worker.st_layout import read_layout
from sie_worker.st_pipeline import Pipeline

log = logging.getLogger("sie.worker")



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


class LeanDenseAdapter(lean_engine.LeanAdapter):
    """A dense encoder's graph session (lean_engine.GraphSession: tokenizer, runtime, buckets, warm-up) and the
    checkpoint's sentence-transformers steps after it (st_head.Head)."""

    capabilities = ("dense",)

    def __init__(self, spec: WorkerSpec, graph: graph_cache.Graph, runtime: str, settings: DenseSettings,
                 head: Head) -> None:
        self.spec, self.graph, self.runtime_kind = spec, graph, runtime
        self.settings, self.head = settings, head
        self.session = lean_engine.GraphSession(spec, graph, runtime, settings.max_length,
                                                lowercase=settings.pipeline.do_lower_case)
        self.max_length = self.session.max_length
        self.dim = settings.pipeline.dim(graph.hidden_size)
        self.prompt_lengths: dict[str, int] = {}

    @property
    def lanes(self) -> graph_runtime.Lanes | None:
        return self.session.lanes

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.session.tokenizer

    def dims(self) -> dict[str, int]:
        return {"dense": self.dim}

    def prepare(self, batch: Any) -> Prepared:
        """Tokenise without padding, then pad each length bucket on its own."""
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        clock = Stopwatch()
        pipeline = self.settings.batch_pipeline(batch.options)
        prompt = self.settings.batch_prompt(batch.options, batch.is_query)
        encodings = self.session.tokenize([prompt + (item.text or "") for item in batch.items], batch.options)
        return Prepared(batch=batch, inputs=self.session.buckets(encodings),
                        token_counts=[len(encoding.ids) for encoding in encodings],
                        tokenize_ms=clock.ms(),
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
        out = np.empty((len(batch.items), self.dim), dtype=np.float32)
        for (indices, feed), hidden in self.bucket_outputs(prepared):
            out[indices] = self.head(hidden, feed["attention_mask"], prompt_length, pipeline)
        return EncodeResult(token_counts=prepared.token_counts, dense=Tensor.from_numpy(out))

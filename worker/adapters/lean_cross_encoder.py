"""Cross-encoder rerankers on CPU without torch (worker process): (query, document) pairs through the Rust tokenizer,
the sequence-classification graph (`graph_cache.SEQUENCE_LOGITS`) under OpenVINO or ONNX Runtime, and the scores in
numpy as `cross_encoder` computes them with torch: a one-label head through the checkpoint's declared activation
(sentence-transformers' `CrossEncoder.predict`), else sigmoid; a two-label head the softmax probability of label 1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sie_worker.adapters import graph_cache
from sie_worker.adapters.base import Prepared, UnsupportedTask
from sie_worker.adapters.batching import Stopwatch
from sie_worker.adapters.lean_engine import GraphSession, LeanAdapter, build_lean
from sie_worker.protocol import ScoreBatch, ScoreResult, Tensor, WorkerSpec
from sie_worker.st_layout import read_layout

log = logging.getLogger("sie.worker")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float32)


# The activations `cross_encoder._ACTIVATIONS` names, in numpy; None (nothing declared) is sigmoid there too.
ACTIVATIONS: dict[str | None, Callable[[np.ndarray], np.ndarray]] = {
    None: _sigmoid,
    "torch.nn.modules.activation.Sigmoid": _sigmoid,
    "torch.nn.modules.linear.Identity": lambda x: x,
    "torch.nn.modules.activation.Tanh": np.tanh,
}


def scores_from_logits(logits: np.ndarray, activation: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """(score, raw) per pair from [N, labels] logits, as `cross_encoder.scores_from_logits`."""
    logits = logits.astype(np.float32)
    if logits.shape[1] == 1:
        raw = logits[:, 0]
        return activation(raw).astype(np.float32), raw
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted[:, 1] / shifted.sum(axis=1)).astype(np.float32), logits[:, 1]


def build(spec: WorkerSpec) -> LeanCrossEncoderAdapter | None:
    """The lean reranker, or None for torch: an activation named that numpy does not compute here, a head other than
    one or two labels (torch then refuses it with the reason), or any reason `lean_engine.build_lean` gives."""
    layout = read_layout(Path(spec.weights_dir))
    name = layout.cross_encoder_activation
    if name not in ACTIVATIONS:
        log.warning("the activation %s is not computed by the lean engine; serving %s with torch", name, spec.model)
        return None
    max_length = spec.max_sequence_length or layout.max_seq_length
    adapter = build_lean(spec, Path(spec.weights_dir), graph_cache.SEQUENCE_LOGITS,
                         lambda graph, runtime: LeanCrossEncoderAdapter(spec, graph, runtime, max_length,
                                                                        ACTIVATIONS[name]))
    if adapter is not None and adapter.session.graph.output_width not in (1, 2):
        adapter.close()
        return None
    return adapter


class LeanCrossEncoderAdapter(LeanAdapter):
    capabilities = ("score",)

    def __init__(self, spec: WorkerSpec, graph: graph_cache.Graph, runtime: str, max_length: int | None,
                 activation: Callable[[np.ndarray], np.ndarray]) -> None:
        self.session = GraphSession(spec, graph, runtime, max_length)
        self.activation = activation

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, ScoreBatch):
            raise UnsupportedTask("this model only scores")
        clock = Stopwatch()
        encodings = self.session.tokenize([(q, d) for q, d in batch.pairs], batch.options)
        return Prepared(batch=batch, inputs=self.session.buckets(encodings),
                        token_counts=[len(encoding.ids) for encoding in encodings], tokenize_ms=clock.ms())

    def forward(self, prepared: Prepared) -> ScoreResult:
        assert self.session.lanes is not None, "load() first"
        scores = np.empty(len(prepared.token_counts), dtype=np.float32)
        raw = np.empty_like(scores)
        for (indices, _), logits in self.bucket_outputs(prepared):
            scores[indices], raw[indices] = scores_from_logits(logits, self.activation)
        return ScoreResult(scores=Tensor.from_numpy(scores), raw=Tensor.from_numpy(raw),
                           token_counts=prepared.token_counts)

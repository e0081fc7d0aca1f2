"""Token-classification NER on the CPU without torch (worker process): texts through the Rust tokenizer (with its
character offsets), the token-classification graph (`graph_cache.TOKEN_LOGITS`) under OpenVINO or ONNX Runtime, each
token's best tag by a numpy softmax, then the same grouping into entity spans as the torch adapter (`ner_rules`, the
pipeline's `aggregation_strategy="simple"`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sie_worker.adapters import graph_cache
from sie_worker.adapters.base import Prepared, UnsupportedTask, refuse_overflow
from sie_worker.adapters.batching import Stopwatch, read_json
from sie_worker.adapters.classifier_rules import texts_of
from sie_worker.adapters.lean_classifier import softmax
from sie_worker.adapters.lean_engine import FALLBACK_MAX_LENGTH, GraphSession, LeanAdapter, build_lean
from sie_worker.adapters.ner_rules import extract_result
from sie_worker.protocol import ExtractBatch, ExtractResult, WorkerSpec


def id2label_of(config: dict[str, Any]) -> dict[int, str]:
    """The tag names as transformers reads them from config.json: `id2label`, else LABEL_i for `num_labels` (2)."""
    named = config.get("id2label")
    if isinstance(named, dict) and named:
        return {int(k): str(v) for k, v in named.items()}
    return {i: f"LABEL_{i}" for i in range(int(config.get("num_labels") or 2))}


def build(spec: WorkerSpec) -> LeanNerAdapter | None:
    """The lean NER adapter, or None for torch: a head whose tags do not name every logit (torch then refuses it with
    the reason), or any reason `lean_engine.build_lean` gives."""
    config = read_json(Path(spec.weights_dir) / "config.json")
    if not isinstance(config, dict):
        return None
    id2label = id2label_of(config)

    def make(graph: graph_cache.Graph, runtime: str) -> LeanNerAdapter:
        # As the torch adapter: the tokenizer's limit and the position table's (512 where the config has none).
        positions = int(config.get("max_position_embeddings") or FALLBACK_MAX_LENGTH)
        max_length = spec.max_sequence_length or min(graph.model_max_length, positions)
        return LeanNerAdapter(spec, graph, runtime, max_length, id2label)

    adapter = build_lean(spec, Path(spec.weights_dir), graph_cache.TOKEN_LOGITS, make)
    if adapter is not None and set(id2label) != set(range(adapter.session.graph.output_width)):
        adapter.close()
        return None
    return adapter


class LeanNerAdapter(LeanAdapter):
    capabilities = ("extract",)

    def __init__(self, spec: WorkerSpec, graph: graph_cache.Graph, runtime: str, max_length: int,
                 id2label: dict[int, str]) -> None:
        self.session = GraphSession(spec, graph, runtime, max_length)
        self.id2label = id2label

    def prepare(self, batch: Any) -> Prepared:
        """Truncated to the maximum length as the torch adapter does (or refused: `overflow_policy: error`); offsets
        and the special-token mask stay here for the grouping."""
        if not isinstance(batch, ExtractBatch):
            raise UnsupportedTask("this model only extracts entities")
        clock = Stopwatch()
        texts, tokenizer, max_length = texts_of(batch), self.session.tokenizer, self.session.max_length
        refuse_overflow(batch, lambda: [len(e.ids) for e in tokenizer.encode_batch(texts, None, offsets=False)],
                        max_length)
        encodings = tokenizer.encode_batch(texts, max_length)
        spans = {"offsets": [e.offsets for e in encodings], "special": [e.special_tokens_mask for e in encodings]}
        return Prepared(batch=batch, inputs=self.session.buckets(encodings),
                        token_counts=[len(e.ids) for e in encodings], tokenize_ms=clock.ms(), extra=spans)

    def tag(self, prepared: Prepared) -> tuple[list[list[float]], list[list[int]]]:
        """Each item's best tag probability and tag per real token (padding dropped), bucket by bucket."""
        assert self.session.lanes is not None, "load() first"
        scores: list[list[float]] = [[] for _ in prepared.token_counts]
        tags: list[list[int]] = [[] for _ in prepared.token_counts]
        for (indices, _), logits in self.bucket_outputs(prepared):
            probabilities = softmax(logits.astype(np.float32))
            best, tag = probabilities.max(axis=-1), probabilities.argmax(axis=-1)
            for row, i in enumerate(indices):
                n = prepared.token_counts[i]
                scores[i], tags[i] = best[row, :n].tolist(), tag[row, :n].tolist()
        return scores, tags

    def forward(self, prepared: Prepared) -> ExtractResult:
        return extract_result(prepared, self.id2label, *self.tag(prepared))

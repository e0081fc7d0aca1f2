"""Sequence classification and NLI zero-shot on CPU without torch (worker process): texts, or (text, hypothesis)
pairs, through the Rust tokenizer and the sequence-classification graph (`graph_cache.SEQUENCE_LOGITS`, the same head
as the cross-encoders'), then the scores in numpy as `classifier` computes them with torch (transformers'
text-classification and zero-shot-classification pipelines).

Served lean only for heads with a padding token of their own: a decoder-style head (GPT-2's) pools the last token
that is not padding, which it finds by the pad id the torch adapter sets at load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding

from sie_worker.adapters import graph_cache
from sie_worker.adapters.base import BadInput, Prepared, UnsupportedTask, refuse_overflow
from sie_worker.adapters.batching import Stopwatch, read_json
from sie_worker.adapters.classifier_rules import hypothesis, label_index, option, sorted_classifications, texts_of
from sie_worker.adapters.lean_engine import GraphSession, LeanAdapter, build_lean
from sie_worker.options import ClassifierOptions
from sie_worker.protocol import ExtractBatch, ExtractItem, ExtractResult, WorkerSpec


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=-1, keepdims=True))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


def build(spec: WorkerSpec) -> LeanClassifierAdapter | None:
    config = read_json(Path(spec.weights_dir) / "config.json")
    if not isinstance(config, dict) or config.get("pad_token_id") is None:
        return None  # a head without its own padding token: the torch adapter sets one (see the module's note)

    def make(graph: graph_cache.Graph, runtime: str) -> LeanClassifierAdapter:
        limits = [graph.model_max_length, int(config.get("max_position_embeddings") or graph.model_max_length)]
        return LeanClassifierAdapter(spec, graph, runtime, spec.max_sequence_length or min(limits), config)

    return build_lean(spec, Path(spec.weights_dir), graph_cache.SEQUENCE_LOGITS, make)


class LeanClassifierAdapter(LeanAdapter):
    capabilities = ("extract",)

    def __init__(self, spec: WorkerSpec, graph: graph_cache.Graph, runtime: str, max_length: int,
                 config: dict[str, Any]) -> None:
        self.session = GraphSession(spec, graph, runtime, max_length)
        self.options = spec.options_as(ClassifierOptions)
        self.id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
        self.problem_type = config.get("problem_type")
        self.entailment = label_index(self.id2label, "entail")
        self.contradiction = self._contradiction_index()

    def _contradiction_index(self) -> int | None:
        if self.entailment is None:
            return None
        found = label_index(self.id2label, "contra")
        if found is not None:
            return found
        return len(self.id2label) - 1 if self.entailment == 0 else 0  # as `classifier` (the pipeline's rule)

    def zero_shot(self, batch: ExtractBatch) -> bool:
        """Whether this batch is NLI zero-shot: labels given, or asked for, or an NLI head by default."""
        wanted = option(batch, "zero_shot", self.options.zero_shot)
        if batch.labels:
            if self.entailment is None:
                raise BadInput("this classifier has fixed labels and no entailment label; it takes no labels")
            return True
        if wanted or (wanted is None and self.entailment is not None):
            raise BadInput("zero-shot classification needs labels")
        return False

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, ExtractBatch):
            raise UnsupportedTask("this model only extracts (classifies)")
        clock = Stopwatch()
        texts = texts_of(batch)
        tokenizer, max_length = self.session.tokenizer, self.session.max_length
        zero_shot = self.zero_shot(batch)
        refuse_overflow(batch, lambda: self._untruncated_counts(batch, texts, zero_shot), max_length)
        if zero_shot:
            encodings = self._pairs(batch, texts)
            per_pair = np.array([len(e.ids) for e in encodings]).reshape(len(texts), len(batch.labels))
            counts = per_pair.sum(axis=1).tolist()
        else:
            encodings = tokenizer.encode_batch(texts, max_length, offsets=False)
            counts = [len(e.ids) for e in encodings]
        return Prepared(batch=batch, inputs=self.session.buckets(encodings), token_counts=counts,
                        tokenize_ms=clock.ms(), extra={"rows": len(encodings)})

    def _untruncated_counts(self, batch: ExtractBatch, texts: list[str], zero_shot: bool) -> list[int]:
        """Each text's tokens, or with zero-shot its longest premise-hypothesis pair's, untruncated."""
        if not zero_shot:
            return [len(e.ids) for e in self.session.tokenizer.encode_batch(texts, None, offsets=False)]
        pairs = self._text_pairs(batch, texts)
        lengths = [len(e.ids) for e in self.session.tokenizer.encode_pairs(pairs, None, offsets=False)]
        return [max(lengths[i:i + len(batch.labels)]) for i in range(0, len(lengths), len(batch.labels))]

    def _text_pairs(self, batch: ExtractBatch, texts: list[str]) -> list[tuple[str, str]]:
        template = str(option(batch, "hypothesis_template", self.options.hypothesis_template))
        return [(text, hypothesis(template, label)) for text in texts for label in batch.labels]

    def _pairs(self, batch: ExtractBatch, texts: list[str]) -> list[Encoding]:
        pairs = self._text_pairs(batch, texts)
        backend = self.session.tokenizer.backend
        try:
            # Truncate only the premise, so that the hypothesis (the label) stays whole, as the pipeline does.
            backend.enable_truncation(self.session.max_length, strategy="only_first")
            return backend.encode_batch_fast(pairs)  # no character offsets: nothing reads them
        except Exception:  # the hypothesis alone is over max_length: trim both, as `classifier` falls back to
            return self.session.tokenizer.encode_pairs(pairs, self.session.max_length, offsets=False)

    def forward(self, prepared: Prepared) -> ExtractResult:
        batch = prepared.batch
        assert isinstance(batch, ExtractBatch) and self.session.lanes is not None
        logits = np.empty((prepared.extra["rows"], self.session.graph.output_width), dtype=np.float32)
        for (indices, _), out in self.bucket_outputs(prepared):
            logits[indices] = out
        raw = bool(option(batch, "raw_scores", self.options.raw_scores))
        if batch.labels:
            items = self._zero_shot_items(batch, logits, raw)
        else:
            items = [self._plain_item(row, raw) for row in logits]
        return ExtractResult(items=items, token_counts=prepared.token_counts)

    def _plain_item(self, logits: np.ndarray, raw: bool) -> ExtractItem:
        if raw or self.problem_type == "regression":
            scores = logits
        elif self.problem_type == "multi_label_classification" or len(self.id2label) == 1:
            scores = _sigmoid(logits)
        else:
            scores = softmax(logits)
        labels = [self.id2label[i] for i in range(len(scores))]
        return ExtractItem(classifications=sorted_classifications(labels, scores.tolist()))

    def _zero_shot_items(self, batch: ExtractBatch, logits: np.ndarray, raw: bool) -> list[ExtractItem]:
        assert self.entailment is not None and self.contradiction is not None
        logits = logits.reshape(len(batch.items), len(batch.labels), -1)
        entail = logits[..., self.entailment]
        if raw:
            scores = entail
        elif bool(option(batch, "multi_label", self.options.multi_label)) or len(batch.labels) == 1:
            scores = softmax(logits[..., [self.contradiction, self.entailment]])[..., 1]
        else:
            scores = softmax(entail)
        return [ExtractItem(classifications=sorted_classifications(batch.labels, row.tolist())) for row in scores]

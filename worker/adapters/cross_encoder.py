"""Cross-encoder rerankers (worker process): (query, document) pairs -> sequence-classification head -> scores.

One-label heads score as sentence-transformers' `CrossEncoder.predict`: the checkpoint's declared activation, else
sigmoid(logit). Two-label heads (our choice) score the softmax probability of label 1. `raw` keeps that logit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sie_worker.adapters.base import LoadInfo, Prepared, UnsupportedTask, truncates
from sie_worker.adapters.torch_common import (
    Stopwatch,
    compute_dtype,
    memory_bytes,
    release,
    to_device,
    tokenize_in_buckets,
    torch_device,
    warm_up,
)
from sie_worker.protocol import ScoreBatch, ScoreResult, Tensor, WorkerSpec
from sie_worker.st_layout import read_layout

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "torch.nn.modules.activation.Sigmoid": torch.sigmoid,
    "torch.nn.modules.linear.Identity": lambda x: x,
    "torch.nn.modules.activation.Tanh": torch.tanh,
}


def declared_activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation sentence-transformers would apply, as the checkpoint names it (st_layout); sigmoid if none."""
    return _ACTIVATIONS.get(str(name), torch.sigmoid)


def scores_from_logits(logits: torch.Tensor,
                       activation: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, raw) per pair from [N, labels] logits."""
    logits = logits.float()
    if logits.shape[1] == 1:
        raw = logits[:, 0]
        return activation(raw), raw
    return torch.softmax(logits, dim=1)[:, 1], logits[:, 1]


class CrossEncoderAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch_device(spec.device)
        self.weights_dir = Path(spec.weights_dir)
        layout = read_layout(self.weights_dir)
        self.max_length: int | None = spec.max_sequence_length or layout.max_seq_length
        self.activation = declared_activation(layout.cross_encoder_activation)

    def load(self) -> LoadInfo:
        self.tokenizer = AutoTokenizer.from_pretrained(self.weights_dir, local_files_only=True)
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        model = AutoModelForSequenceClassification.from_pretrained(self.weights_dir, local_files_only=True,
                                                                   dtype=dtype)
        labels = int(model.config.num_labels)
        if labels not in (1, 2):
            raise ValueError(f"a reranker needs a one- or two-label head; this one has {labels} labels")
        self.model = model.to(self.device).eval()
        if self.max_length is None:
            self.max_length = min(int(self.tokenizer.model_max_length), 512)
        warm_up(lambda t: scores_from_logits(self.model(**to_device(t, self.device)).logits, self.activation),
                self.tokenizer, self.max_length, self.spec, self.device)
        return LoadInfo(dims={}, capabilities=["score"], max_sequence_length=self.max_length)

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, ScoreBatch):
            raise UnsupportedTask("this model only scores")
        clock = Stopwatch()
        queries = [query for query, _ in batch.pairs]
        docs = [doc for _, doc in batch.pairs]
        buckets, counts = tokenize_in_buckets(self.tokenizer, queries, self.max_length, pairs=docs,
                                              max_batch_tokens=self.spec.max_batch_tokens, device=self.device,
                                              truncate=truncates(batch.options),
                                              truncation_side=str(batch.options.get("truncation_direction", "right")))
        return Prepared(batch=batch, inputs=buckets, token_counts=counts, tokenize_ms=clock.ms())

    def forward(self, prepared: Prepared) -> ScoreResult:
        scores = np.empty(len(prepared.token_counts), dtype=np.float32)
        raw = np.empty_like(scores)
        with torch.inference_mode():
            for indices, tensors in prepared.inputs:
                logits = self.model(**to_device(tensors, self.device)).logits
                bucket_scores, bucket_raw = scores_from_logits(logits, self.activation)
                scores[indices], raw[indices] = bucket_scores.cpu().numpy(), bucket_raw.cpu().numpy()
        return ScoreResult(scores=Tensor.from_numpy(scores), raw=Tensor.from_numpy(raw),
                           token_counts=prepared.token_counts)

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        release(self.device)

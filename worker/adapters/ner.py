"""Token-classification NER with torch (worker process): BIO tags per token grouped into character-offset entity spans
as transformers' "token-classification" pipeline does with `aggregation_strategy="simple"` (`ner_rules`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from sie_worker.adapters.base import LoadInfo, Prepared, UnsupportedTask, refuse_overflow
from sie_worker.adapters.classifier_rules import texts_of
from sie_worker.adapters.ner_rules import extract_result
from sie_worker.adapters.torch_common import (
    PAD_MULTIPLE,
    Stopwatch,
    call_overhead_tokens,
    compute_dtype,
    length_buckets,
    memory_bytes,
    micro_batch_items,
    release,
    to_device,
    torch_device,
    warm_up,
)
from sie_worker.protocol import ExtractBatch, ExtractResult, WorkerSpec


class NerAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch_device(spec.device)
        self.weights_dir = Path(spec.weights_dir)
        self.max_length = spec.max_sequence_length

    def load(self) -> LoadInfo:
        self.tokenizer = AutoTokenizer.from_pretrained(self.weights_dir, local_files_only=True)
        if not self.tokenizer.is_fast:
            raise ValueError("the ner adapter needs a fast tokenizer (for character offsets)")
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        model = AutoModelForTokenClassification.from_pretrained(self.weights_dir, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}
        if self.max_length is None:
            limits = [int(self.tokenizer.model_max_length),
                      int(getattr(self.model.config, "max_position_embeddings", 512))]
            self.max_length = min(limits)
        # Length buckets of at most the token budget each, as the other families: the warm-up's shape is the largest.
        warm_up(lambda t: torch.softmax(self.model(**to_device(t, self.device)).logits.float(), dim=-1),
                self.tokenizer, self.max_length, self.spec, self.device)
        return LoadInfo(dims={}, capabilities=["extract"], max_sequence_length=self.max_length)

    def prepare(self, batch: Any) -> Prepared:
        """Tokenise unpadded, then pad each length bucket on its own: a long text no longer pads the whole batch."""
        if not isinstance(batch, ExtractBatch):
            raise UnsupportedTask("this model only extracts entities")
        clock = Stopwatch()
        texts = texts_of(batch)
        refuse_overflow(batch, lambda: [len(ids) for ids in self.tokenizer(texts)["input_ids"]], self.max_length)
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                                 return_offsets_mapping=True, return_special_tokens_mask=True)
        counts = [len(ids) for ids in encoded["input_ids"]]
        buckets = []
        for indices in length_buckets(counts, micro_batch_items(self.device.type), self.spec.max_batch_tokens,
                                      call_overhead_tokens(self.device)):
            features = {key: [encoded[key][i] for i in indices] for key in self.tokenizer.model_input_names
                        if key in encoded}
            buckets.append((indices, dict(self.tokenizer.pad(features, pad_to_multiple_of=PAD_MULTIPLE,
                                                             return_tensors="pt"))))
        # Offsets and the special-token mask stay on the host for grouping; only the model inputs travel.
        spans = {"offsets": encoded["offset_mapping"], "special": encoded["special_tokens_mask"]}
        return Prepared(batch=batch, inputs=buckets, token_counts=counts, tokenize_ms=clock.ms(), extra=spans)

    def _tag(self, prepared: Prepared) -> tuple[list[list[float]], list[list[int]]]:
        """Each item's best tag score and tag per token (its own length, padding dropped), bucket by bucket."""
        scores: list[list[float]] = [[] for _ in prepared.token_counts]
        tags: list[list[int]] = [[] for _ in prepared.token_counts]
        left = self.tokenizer.padding_side == "left"
        with torch.inference_mode():
            for indices, inputs in prepared.inputs:
                logits = self.model(**to_device(inputs, self.device)).logits
                best, tag = torch.softmax(logits.float(), dim=-1).max(dim=-1)
                best, tag = best.cpu(), tag.cpu()
                for row, i in enumerate(indices):
                    n = prepared.token_counts[i]
                    kept = slice(best.shape[1] - n, None) if left else slice(0, n)
                    scores[i], tags[i] = best[row, kept].tolist(), tag[row, kept].tolist()
        return scores, tags

    def forward(self, prepared: Prepared) -> ExtractResult:
        return extract_result(prepared, self.id2label, *self._tag(prepared))

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        release(self.device)

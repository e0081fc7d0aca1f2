"""Token-classification NER (worker process): BIO tags per token grouped into character-offset entity spans.

The grouping is transformers' "token-classification" pipeline with `aggregation_strategy="simple"`: each token takes
its argmax tag, adjacent tokens of one entity type merge unless a `B-` tag opens a new one, and the span's score is the
mean of its tokens' scores. Entity text is sliced from the input with the tokenizer's offsets, so it matches exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from sie_sdk.types import Entity
from sie_worker.adapters.base import LoadInfo, Prepared, UnsupportedTask
from sie_worker.adapters.classifier import texts_of
from sie_worker.adapters.torch_common import (
    Stopwatch,
    compute_dtype,
    memory_bytes,
    release,
    to_device,
    torch_device,
    warm_up,
)
from sie_worker.protocol import ExtractBatch, ExtractItem, ExtractResult, WorkerSpec

IGNORED = "O"


@dataclass
class Token:
    """One non-special token with its argmax tag."""

    tag: str
    score: float
    start: int
    end: int


def split_tag(tag: str) -> tuple[str, str]:
    """("B" or "I", entity type); a tag without a B-/I- prefix continues, like the pipeline's `get_tag`."""
    if tag.startswith(("B-", "I-")):
        return tag[0], tag[2:]
    return "I", tag


def group(tokens: list[Token]) -> list[list[Token]]:
    groups: list[list[Token]] = []
    for token in tokens:
        bi, kind = split_tag(token.tag)
        if groups and bi != "B" and split_tag(groups[-1][-1].tag)[1] == kind:
            groups[-1].append(token)
        else:
            groups.append([token])
    return groups


def entities(text: str, tokens: list[Token]) -> list[Entity]:
    found = []
    for members in group(tokens):
        label = members[0].tag.split("-", 1)[-1]  # the pipeline names a group after its first token's tag
        if label == IGNORED:
            continue
        start, end = members[0].start, members[-1].end
        score = float(np.mean(np.array([m.score for m in members], dtype=np.float32)))
        found.append(Entity(text=text[start:end], label=label, score=score, start=start, end=end))
    return found


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
        # A router batch runs as one forward: as many rows as the token budget holds.
        warm_up(lambda t: torch.softmax(self.model(**to_device(t, self.device)).logits.float(), dim=-1),
                self.tokenizer, self.max_length, self.spec, self.device, max_items=self.spec.max_batch_tokens)
        return LoadInfo(dims={}, capabilities=["extract"], max_sequence_length=self.max_length)

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, ExtractBatch):
            raise UnsupportedTask("this model only extracts entities")
        clock = Stopwatch()
        encoded = self.tokenizer(texts_of(batch), padding=True, truncation=True, max_length=self.max_length,
                                 return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
        # Offsets and the special-token mask stay on the host for grouping; only the model inputs travel.
        spans = {"offsets": encoded.pop("offset_mapping").tolist(),
                 "special": (encoded.pop("special_tokens_mask") | (1 - encoded["attention_mask"])).tolist()}
        counts = encoded["attention_mask"].sum(dim=1).tolist()
        return Prepared(batch=batch, inputs=dict(encoded), token_counts=counts, tokenize_ms=clock.ms(), extra=spans)

    def forward(self, prepared: Prepared) -> ExtractResult:
        batch = prepared.batch
        assert isinstance(batch, ExtractBatch)
        with torch.inference_mode():
            logits = self.model(**to_device(prepared.inputs, self.device)).logits
            probs = torch.softmax(logits.float(), dim=-1).cpu()
        best, tags = probs.max(dim=-1)
        wanted = set(batch.labels)
        items = []
        for i, item in enumerate(batch.items):
            tokens = self._tokens(best[i].tolist(), tags[i].tolist(), prepared.extra["offsets"][i],
                                  prepared.extra["special"][i])
            found = entities(item.text or "", tokens)
            if wanted:  # labels narrow a fixed tag set down to the types the caller asked for
                found = [e for e in found if e.label in wanted]
            items.append(ExtractItem(entities=found))
        return ExtractResult(items=items, token_counts=prepared.token_counts)

    def _tokens(self, scores: list[float], tags: list[int], offsets: list[list[int]],
                special: list[int]) -> list[Token]:
        return [Token(self.id2label[tag], score, start, end)
                for score, tag, (start, end), skip in zip(scores, tags, offsets, special, strict=True) if not skip]

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        release(self.device)

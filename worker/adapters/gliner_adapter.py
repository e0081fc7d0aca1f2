"""GLiNER span NER (worker process): entities of the caller's labels, through the `gliner` package's own inference.

`prepare` only checks the batch and counts tokens; GLiNER's word splitting and span decoding run inside its
`inference`, on the main thread, so the results are exactly `GLiNER.predict_entities`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch

from sie_sdk.types import Entity
from sie_worker.adapters.base import BadInput, LoadInfo, Prepared, UnsupportedTask, refuse_overflow
from sie_worker.adapters.classifier_rules import option, texts_of
from sie_worker.adapters.torch_common import (
    MICRO_BATCH_ITEMS,
    Stopwatch,
    compute_dtype,
    full_warm_up,
    memory_bytes,
    release,
    torch_device,
)
from sie_worker.options import GlinerOptions
from sie_worker.protocol import ExtractBatch, ExtractItem, ExtractResult, WorkerSpec

with warnings.catch_warnings():
    # gliner decorates with torch.jit.script, deprecated in torch 2.13; nothing to act on here.
    warnings.simplefilter("ignore", DeprecationWarning)
    from gliner import GLiNER


def to_entity(found: dict[str, Any]) -> Entity:
    return Entity(text=str(found["text"]), label=str(found["label"]), score=float(found["score"]),
                  start=int(found["start"]), end=int(found["end"]))


class GlinerAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch_device(spec.device)
        self.weights_dir = Path(spec.weights_dir)
        self.options = spec.options_as(GlinerOptions)

    def load(self) -> LoadInfo:
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        model = GLiNER.from_pretrained(str(self.weights_dir), local_files_only=True, map_location=str(self.device),
                                       dtype=None if dtype is torch.float32 else dtype)
        self.model = model.to(self.device).eval()
        # A copy for the prepare thread: a fast tokenizer is not safe to share with `inference` on the main thread.
        self.tokenizer = copy.deepcopy(model.data_processor.transformer_tokenizer)
        max_length = self.spec.max_sequence_length or getattr(model.config, "max_len", None)
        self._warm_up(int(max_length or 384))
        return LoadInfo(dims={}, capabilities=["extract"], max_sequence_length=max_length)

    def _warm_up(self, words: int) -> None:
        """GLiNER's own inference on texts of its full length, as many as the token budget holds (where full_warm_up
        says so: on a GPU), then one short one; synchronised on a GPU, so an OOM or a CUDA error shows at load."""
        rows = max(1, min(MICRO_BATCH_ITEMS, self.spec.max_batch_tokens // max(1, words)))
        full = [[" ".join(["word"] * words)] * rows] if full_warm_up(self.spec, self.device) else []
        for texts in [*full, ["word"]]:
            self.model.inference(texts, ["entity"], threshold=0.5, batch_size=len(texts))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, ExtractBatch):
            raise UnsupportedTask("this model only extracts entities")
        if not batch.labels:
            raise BadInput("GLiNER needs labels: the entity types to look for")
        clock = Stopwatch()
        texts = texts_of(batch)
        # GLiNER cuts a text at `max_len` of its own word tokens (its processor's splitter), not at subwords.
        splitter = self.model.data_processor.words_splitter
        refuse_overflow(batch, lambda: [sum(1 for _ in splitter(text)) for text in texts], self.model.config.max_len)
        counts = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return Prepared(batch=batch, inputs=texts, token_counts=counts, tokenize_ms=clock.ms())

    def forward(self, prepared: Prepared) -> ExtractResult:
        batch = prepared.batch
        assert isinstance(batch, ExtractBatch)
        threshold = float(option(batch, "threshold", self.options.threshold))
        flat_ner = bool(option(batch, "flat_ner", self.options.flat_ner))
        multi_label = bool(option(batch, "multi_label", self.options.multi_label))
        with warnings.catch_warnings():  # one per text it cuts: the cut is `overflow_policy`'s default, not news
            warnings.filterwarnings("ignore", message="Sentence of length .* has been truncated", category=UserWarning)
            found = self.model.inference(prepared.inputs, list(batch.labels), flat_ner=flat_ner, threshold=threshold,
                                         multi_label=multi_label, batch_size=max(1, len(prepared.inputs)))
        items = [ExtractItem(entities=[to_entity(e) for e in spans]) for spans in found]
        return ExtractResult(items=items, token_counts=prepared.token_counts)

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        release(self.device)

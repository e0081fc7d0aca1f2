"""Sequence classification and NLI zero-shot classification (worker process): text in, sorted `classifications` out.

Plain heads score each text against the labels in `id2label`, as transformers' "text-classification" pipeline does;
NLI heads score each (text, hypothesis) pair, as its "zero-shot-classification" pipeline does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sie_worker.adapters.base import BadInput, LoadInfo, Prepared, UnsupportedTask, refuse_overflow
from sie_worker.adapters.classifier_rules import hypothesis, label_index, option, sorted_classifications, texts_of
from sie_worker.adapters.torch_common import (
    Stopwatch,
    compute_dtype,
    memory_bytes,
    release,
    to_device,
    torch_device,
    warm_up,
)
from sie_worker.options import ClassifierOptions
from sie_worker.protocol import ExtractBatch, ExtractItem, ExtractResult, WorkerSpec


class ClassifierAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch_device(spec.device)
        self.weights_dir = Path(spec.weights_dir)
        self.max_length = spec.max_sequence_length
        self.options = spec.options_as(ClassifierOptions)

    def load(self) -> LoadInfo:
        self.tokenizer = AutoTokenizer.from_pretrained(self.weights_dir, local_files_only=True)
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        model = AutoModelForSequenceClassification.from_pretrained(self.weights_dir, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        config = self.model.config
        if self.tokenizer.pad_token is None:  # decoder-style heads: batches need padding (the pipeline does the same)
            self.tokenizer.pad_token = self.tokenizer.eos_token
            config.pad_token_id = config.pad_token_id or self.tokenizer.pad_token_id
        self.id2label = {int(k): str(v) for k, v in config.id2label.items()}
        self.entailment = label_index(self.id2label, "entail")
        self.contradiction = self._contradiction_index()
        if self.max_length is None:
            limits = [int(self.tokenizer.model_max_length), int(getattr(config, "max_position_embeddings", 512))]
            self.max_length = min(limits)
        # `_logits` runs chunks of up to max_batch_tokens tokens, with no cap on rows.
        warm_up(self._logits, self.tokenizer, self.max_length, self.spec, self.device,
                max_items=self.spec.max_batch_tokens)
        return LoadInfo(dims={}, capabilities=["extract"], max_sequence_length=self.max_length)

    def _contradiction_index(self) -> int | None:
        if self.entailment is None:
            return None
        found = label_index(self.id2label, "contra")
        if found is not None:
            return found
        # The pipeline's rule for heads without a "contradiction" label (e.g. entailment / not_entailment).
        return len(self.id2label) - 1 if self.entailment == 0 else 0

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
        zero_shot = self.zero_shot(batch)
        refuse_overflow(batch, lambda: self._untruncated_counts(batch, texts, zero_shot), self.max_length)
        if zero_shot:
            encoded, counts = self._tokenize_pairs(batch, texts)
        else:
            encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
            counts = encoded["attention_mask"].sum(dim=1).tolist()
        return Prepared(batch=batch, inputs=dict(encoded), token_counts=counts, tokenize_ms=clock.ms())

    def _untruncated_counts(self, batch: ExtractBatch, texts: list[str], zero_shot: bool) -> list[int]:
        """Each text's tokens, or with zero-shot its longest premise-hypothesis pair's, untruncated."""
        if not zero_shot:
            return [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        lengths = [len(ids) for ids in self.tokenizer(self._pairs(batch, texts))["input_ids"]]
        return [max(lengths[i:i + len(batch.labels)]) for i in range(0, len(lengths), len(batch.labels))]

    def _pairs(self, batch: ExtractBatch, texts: list[str]) -> list[tuple[str, str]]:
        template = str(option(batch, "hypothesis_template", self.options.hypothesis_template))
        return [(text, hypothesis(template, label)) for text in texts for label in batch.labels]

    def _tokenize_pairs(self, batch: ExtractBatch, texts: list[str]) -> tuple[Any, list[int]]:
        pairs = self._pairs(batch, texts)
        kwargs: dict[str, Any] = {"padding": True, "max_length": self.max_length, "return_tensors": "pt"}
        try:
            # Truncate only the premise, so that the hypothesis (the label) stays whole, as the pipeline does.
            encoded = self.tokenizer(pairs, truncation="only_first", **kwargs)
        except Exception:  # the hypothesis alone is over max_length: fall back to trimming both
            encoded = self.tokenizer(pairs, truncation="longest_first", **kwargs)
        per_pair = encoded["attention_mask"].sum(dim=1).view(len(texts), len(batch.labels))
        return encoded, per_pair.sum(dim=1).tolist()

    def forward(self, prepared: Prepared) -> ExtractResult:
        batch = prepared.batch
        assert isinstance(batch, ExtractBatch)
        logits = self._logits(prepared.inputs)
        raw = bool(option(batch, "raw_scores", self.options.raw_scores))
        if batch.labels:
            items = self._zero_shot_items(batch, logits, raw)
        else:
            items = [self._plain_item(row, raw) for row in logits]
        return ExtractResult(items=items, token_counts=prepared.token_counts)

    def _logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 logits on the CPU, one row per input row, run in chunks of at most `max_batch_tokens` tokens."""
        rows, width = inputs["input_ids"].shape
        step = max(1, self.spec.max_batch_tokens // max(1, width))
        out = []
        with torch.inference_mode():
            for start in range(0, rows, step):
                chunk = to_device({k: v[start:start + step] for k, v in inputs.items()}, self.device)
                out.append(self.model(**chunk).logits.float().cpu())
        return torch.cat(out)

    def _plain_item(self, logits: torch.Tensor, raw: bool) -> ExtractItem:
        problem = self.model.config.problem_type
        if raw or problem == "regression":
            scores = logits
        elif problem == "multi_label_classification" or len(self.id2label) == 1:
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, dim=-1)
        labels = [self.id2label[i] for i in range(len(scores))]
        return ExtractItem(classifications=sorted_classifications(labels, scores.tolist()))

    def _zero_shot_items(self, batch: ExtractBatch, logits: torch.Tensor, raw: bool) -> list[ExtractItem]:
        assert self.entailment is not None and self.contradiction is not None
        logits = logits.view(len(batch.items), len(batch.labels), -1)
        entail = logits[..., self.entailment]
        if raw:
            scores = entail
        elif bool(option(batch, "multi_label", self.options.multi_label)) or len(batch.labels) == 1:
            # Each label on its own: entailment against contradiction.
            scores = torch.softmax(logits[..., [self.contradiction, self.entailment]], dim=-1)[..., 1]
        else:
            scores = torch.softmax(entail, dim=-1)
        return [ExtractItem(classifications=sorted_classifications(batch.labels, row.tolist())) for row in scores]

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        release(self.device)

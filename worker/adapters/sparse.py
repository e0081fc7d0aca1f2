"""SPLADE sparse embeddings (worker process): masked-LM logits -> log1p(relu) -> max over tokens -> CSR rows.

The checkpoint's SPLADE settings are read in `lean_sparse.splade_settings`, for this adapter and the lean one alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from sie_worker.adapters.base import LoadInfo, Prepared, UnsupportedTask
from sie_worker.adapters.lean_sparse import splade_settings
from sie_worker.adapters.packing import SparseRow, join_sparse
from sie_worker.adapters.torch_common import (
    compute_dtype,
    memory_bytes,
    prepare_texts,
    release,
    to_device,
    torch_device,
    warm_up,
)
from sie_worker.protocol import EncodeBatch, EncodeResult, WorkerSpec
from sie_worker.st_layout import read_layout

# Items per forward pass inside one router batch, as the dense family: length buckets keep padding small, and the
# [items, tokens, vocabulary] logits stay bounded.


def sparse_rows(weights: torch.Tensor) -> list[SparseRow]:
    """Each row of a [B, V] matrix as (int32 ascending indices, float32 values) of its entries > 0."""
    keep = weights > 0
    rows, cols = keep.nonzero(as_tuple=True)  # row-major order, so indices ascend within each row
    values = weights[rows, cols].float().cpu().numpy()
    bounds = np.cumsum(keep.sum(dim=1).cpu().numpy())[:-1]
    return list(zip(np.split(cols.to(torch.int32).cpu().numpy(), bounds), np.split(values, bounds), strict=True))


def splade_pool(logits: torch.Tensor, mask: torch.Tensor, strategy: str = "max",
                activation: str = "relu") -> torch.Tensor:
    """[B, T, V] logits -> [B, V] float32 term weights; in place on `logits`, which at vocabulary width dominate
    memory. A sum over the tokens runs in float32 (fp16 loses the small terms of a long text, and can overflow)."""
    weights = logits.mul_(mask.unsqueeze(-1).to(logits.dtype)).relu_().log1p_()
    if activation == "log1p_relu":
        weights = weights.log1p_()
    # Padding rows are 0 after the mask, and every weight is >= 0, so they never win the max.
    return weights.amax(dim=1).float() if strategy == "max" else weights.sum(dim=1, dtype=torch.float32)


class SparseAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch_device(spec.device)
        self.weights_dir = Path(spec.weights_dir)
        self.max_length: int | None = spec.max_sequence_length or read_layout(self.weights_dir).max_seq_length
        self.strategy, self.activation = splade_settings(spec)

    def load(self) -> LoadInfo:
        self.tokenizer = AutoTokenizer.from_pretrained(self.weights_dir, local_files_only=True)
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        model = AutoModelForMaskedLM.from_pretrained(self.weights_dir, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        if self.max_length is None:
            self.max_length = min(int(self.tokenizer.model_max_length), 512)
        vocab = int(self.model.config.vocab_size)
        warm_up(self._term_weights, self.tokenizer, self.max_length, self.spec, self.device)
        return LoadInfo(dims={"sparse": vocab}, capabilities=["sparse"], max_sequence_length=self.max_length)

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        if set(batch.output_types) - {"sparse"}:
            raise UnsupportedTask(f"this model only has sparse outputs, not {sorted(batch.output_types)}")
        return prepare_texts(batch, self.tokenizer, self.max_length, self.spec.max_batch_tokens, self.device)

    def forward(self, prepared: Prepared) -> EncodeResult:
        parts: list[SparseRow] = [(np.empty(0, np.int32), np.empty(0, np.float32))] * len(prepared.token_counts)
        with torch.inference_mode():
            for indices, tensors in prepared.inputs:
                weights = self._term_weights(tensors)
                for i, row in zip(indices, sparse_rows(weights), strict=True):
                    parts[i] = row
        sparse_indices, sparse_values, sparse_offsets = join_sparse(parts)
        return EncodeResult(token_counts=prepared.token_counts, sparse_indices=sparse_indices,
                            sparse_values=sparse_values, sparse_offsets=sparse_offsets)

    def _term_weights(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = to_device(tensors, self.device)
        logits = self.model(**inputs).logits
        return splade_pool(logits, inputs["attention_mask"], self.strategy, self.activation)

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        release(self.device)

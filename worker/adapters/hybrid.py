"""BGE-M3 style hybrid embeddings (worker process): one encoder pass gives dense, sparse and multivector outputs.

Checkpoint layout as BAAI/bge-m3: a Hugging Face encoder folder plus `sparse_linear.pt` (Linear(hidden, 1)) and
`colbert_linear.pt` (Linear(hidden, dim)) state dicts. The formulas follow FlagEmbedding's `BGEM3FlagModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from sie_worker.adapters.base import LoadInfo, Prepared, UnsupportedTask
from sie_worker.adapters.multivector import token_rows
from sie_worker.adapters.packing import SparseRow, join_rows, join_sparse
from sie_worker.adapters.sparse import sparse_rows
from sie_worker.adapters.torch_common import (
    compute_dtype,
    memory_bytes,
    prepare_texts,
    release,
    to_device,
    torch_device,
    warm_up,
)
from sie_worker.protocol import EncodeBatch, EncodeResult, HybridOptions, Tensor, WorkerSpec

OUTPUTS = ("dense", "sparse", "multivector")


def load_linear(path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Linear:
    """A `torch.nn.Linear` from a saved state dict, its shape read off the weight."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    out_features, in_features = state["weight"].shape
    linear = torch.nn.Linear(in_features, out_features, bias="bias" in state)
    linear.load_state_dict(state)
    return linear.to(device, dtype).eval()


def special_ids(tokenizer: Any) -> list[int]:
    """Ids that never carry lexical weight, FlagEmbedding's list: cls, eos, pad, unk (XLM-R's eos is also its sep)."""
    names = ("cls_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    return sorted({int(i) for i in (getattr(tokenizer, n, None) for n in names) if i is not None})


def dense_vectors(hidden: torch.Tensor, normalize: bool) -> torch.Tensor:
    vectors = hidden[:, 0].float()
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors


def sparse_weights(hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, head: torch.nn.Linear,
                   vocab_size: int, skip_ids: list[int]) -> torch.Tensor:
    """[B, V]: relu(head(h)) per token, max over the tokens that share an id, special ids zeroed."""
    token_weights = torch.relu(head(hidden)).squeeze(-1).float() * mask
    weights = torch.zeros(hidden.shape[0], vocab_size, dtype=torch.float32, device=hidden.device)
    weights.scatter_reduce_(1, input_ids, token_weights, reduce="amax")
    weights[:, skip_ids] = 0.0
    return weights


def colbert_vectors(hidden: torch.Tensor, mask: torch.Tensor, head: torch.nn.Linear,
                    normalize: bool) -> list[np.ndarray]:
    """Per item, every non-padding token after the first (CLS) through the head, normalised."""
    vectors = head(hidden[:, 1:]).float() * mask[:, 1:].unsqueeze(-1)
    if normalize:
        vectors = F.normalize(vectors, p=2, dim=-1)
    return token_rows(vectors, mask[:, 1:])


@dataclass
class Outputs:
    """Per-item outputs gathered across the length buckets of one batch, in item order."""

    dense: list[np.ndarray]
    sparse: list[SparseRow]
    multivector: list[np.ndarray]

    @classmethod
    def sized(cls, count: int) -> Outputs:
        # Each requested slot is overwritten by exactly one bucket; the placeholders only give the lists their length.
        empty = np.empty(0, np.float32)
        return cls([empty] * count, [(np.empty(0, np.int32), empty)] * count, [empty] * count)


class HybridAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch_device(spec.device)
        self.weights_dir = Path(spec.weights_dir)
        self.max_length: int | None = spec.max_sequence_length
        self.normalize = spec.options_as(HybridOptions).normalize

    def load(self) -> LoadInfo:
        self.tokenizer = AutoTokenizer.from_pretrained(self.weights_dir, local_files_only=True)
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        model = AutoModel.from_pretrained(self.weights_dir, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.heads = {name: load_linear(self.weights_dir / f"{name}_linear.pt", dtype, self.device)
                      for name in ("sparse", "colbert")}
        self.colbert_dim = int(self.heads["colbert"].out_features)
        self.vocab_size = int(self.model.config.vocab_size)
        self.skip_ids = special_ids(self.tokenizer)
        if self.max_length is None:
            self.max_length = min(int(self.tokenizer.model_max_length), 8192)
        dims = {"dense": int(self.model.config.hidden_size), "sparse": self.vocab_size,
                "multivector": self.colbert_dim}
        # All three heads at the budget: BGE-M3's 8192 tokens are where a GPU runs out of memory, if anywhere.
        warm_up(lambda t: self._forward_bucket(list(range(len(t["input_ids"]))), to_device(t, self.device),
                                               list(OUTPUTS), Outputs.sized(len(t["input_ids"]))),
                self.tokenizer, self.max_length, self.spec, self.device)
        return LoadInfo(dims=dims, capabilities=list(OUTPUTS), max_sequence_length=self.max_length)

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        if set(batch.output_types) - set(OUTPUTS):
            raise UnsupportedTask(f"this model has no {sorted(set(batch.output_types) - set(OUTPUTS))} outputs")
        return prepare_texts(batch, self.tokenizer, self.max_length, self.spec.max_batch_tokens, self.device)

    def forward(self, prepared: Prepared) -> EncodeResult:
        batch = prepared.batch
        assert isinstance(batch, EncodeBatch)
        out = Outputs.sized(len(prepared.token_counts))
        with torch.inference_mode():
            for indices, tensors in prepared.inputs:
                self._forward_bucket(indices, to_device(tensors, self.device), batch.output_types, out)
        return self._result(prepared.token_counts, batch.output_types, out)

    def _forward_bucket(self, indices: list[int], inputs: dict[str, torch.Tensor], output_types: list[str],
                        out: Outputs) -> None:
        hidden = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"]
        if "dense" in output_types:
            for i, row in zip(indices, dense_vectors(hidden, self.normalize).cpu().numpy(), strict=True):
                out.dense[i] = row
        if "sparse" in output_types:
            weights = sparse_weights(hidden, inputs["input_ids"], mask, self.heads["sparse"], self.vocab_size,
                                     self.skip_ids)
            for i, pair in zip(indices, sparse_rows(weights), strict=True):
                out.sparse[i] = pair
        if "multivector" in output_types:
            for i, rows in zip(indices, colbert_vectors(hidden, mask, self.heads["colbert"], self.normalize),
                               strict=True):
                out.multivector[i] = rows

    def _result(self, token_counts: list[int], output_types: list[str], out: Outputs) -> EncodeResult:
        result = EncodeResult(token_counts=token_counts)
        if "dense" in output_types:
            result.dense = Tensor.from_numpy(np.stack(out.dense))
        if "sparse" in output_types:
            result.sparse_indices, result.sparse_values, result.sparse_offsets = join_sparse(out.sparse)
        if "multivector" in output_types:
            result.multivector, result.multivector_offsets = join_rows(out.multivector, self.colbert_dim)
        return result

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        self.heads.clear()
        release(self.device)

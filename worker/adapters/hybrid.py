"""BGE-M3 style hybrid embeddings (worker process): one encoder pass gives dense, sparse and multivector outputs.

Checkpoint layout as BAAI/bge-m3: a Hugging Face encoder folder plus `sparse_linear.pt` (Linear(hidden, 1)) and
`colbert_linear.pt` (Linear(hidden, dim)) state dicts. The formulas follow FlagEmbedding's `BGEM3FlagModel`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from sie_worker.adapters.base import LoadInfo, Prepared
from sie_worker.adapters.hybrid_heads import HEAD_FILES, MAX_LENGTH, OUTPUTS, SKIP_ROLES, Outputs, check_batch
from sie_worker.adapters.multivector import token_rows
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
from sie_worker.options import HybridOptions
from sie_worker.protocol import EncodeBatch, EncodeResult, WorkerSpec


def load_linear(path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Linear:
    """A `torch.nn.Linear` from a saved state dict, its shape read off the weight."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    out_features, in_features = state["weight"].shape
    linear = torch.nn.Linear(in_features, out_features, bias="bias" in state)
    linear.load_state_dict(state)
    return linear.to(device, dtype).eval()


def special_ids(tokenizer: Any) -> list[int]:
    """Ids that never carry lexical weight (hybrid_heads.SKIP_ROLES)."""
    found = (getattr(tokenizer, f"{role}_token_id", None) for role in SKIP_ROLES)
    return sorted({int(i) for i in found if i is not None})


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
        self.heads = {name: load_linear(self.weights_dir / file, dtype, self.device)
                      for name, file in HEAD_FILES.items()}
        self.colbert_dim = int(self.heads["colbert"].out_features)
        self.vocab_size = int(self.model.config.vocab_size)
        self.skip_ids = special_ids(self.tokenizer)
        if self.max_length is None:
            self.max_length = min(int(self.tokenizer.model_max_length), MAX_LENGTH)
        dims = {"dense": int(self.model.config.hidden_size), "sparse": self.vocab_size,
                "multivector": self.colbert_dim}
        # All three heads at the budget: BGE-M3's 8192 tokens are where a GPU runs out of memory, if anywhere.
        warm_up(lambda t: self._forward_bucket(list(range(len(t["input_ids"]))), to_device(t, self.device),
                                               list(OUTPUTS), Outputs.sized(len(t["input_ids"]))),
                self.tokenizer, self.max_length, self.spec, self.device)
        return LoadInfo(dims=dims, capabilities=list(OUTPUTS), max_sequence_length=self.max_length)

    def prepare(self, batch: Any) -> Prepared:
        return prepare_texts(check_batch(batch), self.tokenizer, self.max_length, self.spec.max_batch_tokens,
                             self.device)

    def forward(self, prepared: Prepared) -> EncodeResult:
        batch = prepared.batch
        assert isinstance(batch, EncodeBatch)
        out = Outputs.sized(len(prepared.token_counts))
        with torch.inference_mode():
            for indices, tensors in prepared.inputs:
                self._forward_bucket(indices, to_device(tensors, self.device), batch.output_types, out)
        return out.result(prepared.token_counts, batch.output_types, self.colbert_dim)

    def _forward_bucket(self, indices: list[int], inputs: dict[str, torch.Tensor], output_types: list[str],
                        out: Outputs) -> None:
        hidden = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"]
        if "dense" in output_types:
            out.put("dense", indices, dense_vectors(hidden, self.normalize).cpu().numpy())
        if "sparse" in output_types:
            weights = sparse_weights(hidden, inputs["input_ids"], mask, self.heads["sparse"], self.vocab_size,
                                     self.skip_ids)
            out.put("sparse", indices, sparse_rows(weights))
        if "multivector" in output_types:
            out.put("multivector", indices, colbert_vectors(hidden, mask, self.heads["colbert"], self.normalize))

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        self.heads.clear()
        release(self.device)

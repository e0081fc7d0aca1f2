"""Dense embeddings (worker process): transformers encoder, pooling (mean, CLS, last) and L2 normalisation.

Pooling and normalisation default to what the checkpoint's sentence-transformers files say (`modules.json`,
`1_Pooling/config.json`, `sentence_bert_config.json`); model-config options override them. This is the torch engine:
GPUs, `engine: torch`, and any checkpoint that cannot be served from an exported graph. On CPU the other engines serve
dense encoders without torch (`dense_lean.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from sie_worker.adapters.base import BadInput, LoadInfo, Prepared, UnsupportedTask
from sie_worker.adapters.st_config import dense_settings
from sie_worker.adapters.torch_common import (
    Buckets,
    compute_dtype,
    memory_bytes,
    prepare_texts,
    release,
    to_device,
    torch_device,
    warm_up,
)
from sie_worker.protocol import EncodeBatch, EncodeResult, Tensor, WorkerSpec

POOLINGS = ("mean", "cls", "last", "last_token", "none")

log = logging.getLogger("sie.worker")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, H] -> [B, H], always float32: a sum over thousands of fp16 tokens overflows fp16's 65504 (8192 tokens
    near 9 give inf, then NaN once normalised)."""
    if how == "cls":
        return hidden[:, 0].float()
    if how in ("last", "last_token"):
        # Last non-padding token, whichever side the tokenizer pads on.
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    if how == "mean":
        weights = mask.unsqueeze(-1).to(torch.float32)
        return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    raise ValueError(f"unknown pooling {how!r}; expected one of {POOLINGS}")


class DenseAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch_device(spec.device)
        self.weights_dir = Path(spec.weights_dir)
        settings = dense_settings(spec)
        self.max_length, self.pooling, self.normalize = settings.max_length, settings.pooling, settings.normalize

    def load(self) -> LoadInfo:
        self.tokenizer = AutoTokenizer.from_pretrained(self.weights_dir, local_files_only=True)
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        model = AutoModel.from_pretrained(self.weights_dir, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        if self.max_length is None:
            self.max_length = min(int(self.tokenizer.model_max_length), 512)
        self.dim = dim = int(self.model.config.hidden_size)
        log.info("engine: torch (%s)", self.device.type)
        self.warm_up()
        return LoadInfo(dims={"dense": dim}, capabilities=["dense"], max_sequence_length=self.max_length)

    def warm_up(self) -> None:
        """The largest micro-batch, then a small one (torch_common.warm_up); RSS then stays flat under load."""
        assert self.max_length is not None

        def run(tensors: dict[str, torch.Tensor]) -> None:
            for _, inputs, hidden in self.encoded([(list(range(len(tensors["input_ids"]))), tensors)]):
                pool(hidden, inputs["attention_mask"].to(hidden.device), self.pooling)

        # At the budget on the CPU too: MiniLM-class encoders take it in a second, and RSS then stays flat.
        warm_up(run, self.tokenizer, self.max_length, self.spec, self.device, on_cpu=True)

    def encoded(self, buckets: Buckets) -> Iterator[tuple[list[int], dict[str, torch.Tensor], torch.Tensor]]:
        """(item indices, inputs on the device, last hidden state) per bucket, one at a time, so that a GPU holds one
        bucket's activations."""
        for indices, tensors in buckets:
            inputs = to_device(tensors, self.device)
            yield indices, inputs, self.model(**inputs).last_hidden_state

    def prepare(self, batch: Any) -> Prepared:
        """Tokenise without padding, then pad each length bucket on its own."""
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        return prepare_texts(batch, self.tokenizer, self.max_length, self.spec.max_batch_tokens, self.device)

    def forward(self, prepared: Prepared) -> EncodeResult:
        batch = prepared.batch
        assert isinstance(batch, EncodeBatch)
        pooling = str(batch.options.get("pooling", self.pooling))
        if pooling not in ("mean", "cls", "last", "last_token"):
            raise BadInput(f"options.pooling must be mean, cls, last or last_token, not {pooling!r}")
        normalize = bool(batch.options.get("normalize", self.normalize))
        out = np.empty((len(batch.items), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for indices, inputs, hidden in self.encoded(prepared.inputs):
                vectors = pool(hidden, inputs["attention_mask"], pooling)
                if normalize:
                    vectors = F.normalize(vectors, p=2, dim=1)
                out[indices] = vectors.cpu().numpy()
        return EncodeResult(token_counts=prepared.token_counts, dense=Tensor.from_numpy(out))

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        release(self.device)

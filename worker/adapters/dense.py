"""Dense embeddings (worker process): transformers encoder, pooling (mean, CLS, last) and L2 normalisation.

Pooling and normalisation default to what the checkpoint's sentence-transformers files say (`modules.json`,
`1_Pooling/config.json`, `sentence_bert_config.json`); model-config options override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from sie_worker.adapters.base import BadInput, LoadInfo, Prepared, UnsupportedTask
from sie_worker.adapters.torch_common import (
    MICRO_BATCH_ITEMS,
    Stopwatch,
    compute_dtype,
    memory_bytes,
    read_json,
    release,
    to_device,
    tokenize_in_buckets,
    torch_device,
)
from sie_worker.protocol import EncodeBatch, EncodeResult, Tensor, WorkerSpec

POOLINGS = ("mean", "cls", "last", "last_token", "none")


def sentence_transformers_defaults(weights_dir: Path) -> dict[str, Any]:
    """Pooling, normalisation and max length as the checkpoint's sentence-transformers config declares them."""
    found: dict[str, Any] = {}
    modules = read_json(weights_dir / "modules.json")
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            found["normalize"] = True
        if kind.endswith("Pooling"):
            pooling = read_json(weights_dir / module.get("path", "1_Pooling") / "config.json") or {}
            if pooling.get("pooling_mode_cls_token"):
                found["pooling"] = "cls"
            elif pooling.get("pooling_mode_lasttoken"):
                found["pooling"] = "last"
            elif pooling.get("pooling_mode_mean_tokens"):
                found["pooling"] = "mean"
    max_len = (read_json(weights_dir / "sentence_bert_config.json") or {}).get("max_seq_length")
    if max_len:
        found["max_sequence_length"] = int(max_len)
    return found


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    if how in ("last", "last_token"):
        # Last non-padding token, whichever side the tokenizer pads on.
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    raise ValueError(f"unknown pooling {how!r}; expected one of {POOLINGS}")


class DenseAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch_device(spec.device)
        self.weights_dir = Path(spec.weights_dir)
        defaults = sentence_transformers_defaults(self.weights_dir)
        self.max_length = spec.max_sequence_length or defaults.get("max_sequence_length")
        pooling = spec.loadtime.get("pooling") or spec.runtime.get("pooling")
        self.pooling = str(pooling or defaults.get("pooling", "mean"))
        normalize = spec.loadtime.get("normalize", spec.runtime.get("normalize"))
        self.normalize = bool(defaults.get("normalize", False) if normalize is None else normalize)

    def load(self) -> LoadInfo:
        self.tokenizer = AutoTokenizer.from_pretrained(self.weights_dir, local_files_only=True)
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        model = AutoModel.from_pretrained(self.weights_dir, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        if self.max_length is None:
            self.max_length = min(int(self.tokenizer.model_max_length), 512)
        self.dim = dim = int(self.model.config.hidden_size)
        self.warm_up()
        return LoadInfo(dims={"dense": dim}, capabilities=["dense"], max_sequence_length=self.max_length)

    def warm_up(self) -> None:
        """One forward at the largest micro-batch the worker will run, so a GPU out-of-memory shows at load, not
        under traffic (the memory stays in torch's cache); on CPU a small pass primes the kernels."""
        assert self.max_length is not None
        if self.device.type == "cuda":
            rows = max(1, min(MICRO_BATCH_ITEMS, self.spec.max_batch_tokens // self.max_length))
            length = self.max_length
        else:
            rows, length = 1, 8
        ids = torch.full((rows, length), int(self.tokenizer.pad_token_id or 0), dtype=torch.long)
        inputs = to_device({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, self.device)
        with torch.inference_mode():
            self.model(**inputs)

    def prepare(self, batch: Any) -> Prepared:
        """Tokenise without padding, then pad each length bucket on its own."""
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        clock = Stopwatch()
        texts = [item.text or "" for item in batch.items]
        buckets, counts = tokenize_in_buckets(self.tokenizer, texts, self.max_length,
                                              max_batch_tokens=self.spec.max_batch_tokens,
                                              truncate=batch.options.get("truncate", True) is not False)
        return Prepared(batch=batch, inputs=buckets, token_counts=counts, tokenize_ms=clock.ms())

    def forward(self, prepared: Prepared) -> EncodeResult:
        batch = prepared.batch
        assert isinstance(batch, EncodeBatch)
        pooling = str(batch.options.get("pooling", self.pooling))
        if pooling not in ("mean", "cls", "last", "last_token"):
            raise BadInput(f"options.pooling must be mean, cls, last or last_token, not {pooling!r}")
        normalize = bool(batch.options.get("normalize", self.normalize))
        out = np.empty((len(batch.items), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for indices, tensors in prepared.inputs:
                inputs = to_device(tensors, self.device)
                hidden = self.model(**inputs).last_hidden_state
                vectors = pool(hidden, inputs["attention_mask"], pooling).float()
                if normalize:
                    vectors = F.normalize(vectors, p=2, dim=1)
                out[indices] = vectors.cpu().numpy()
        return EncodeResult(token_counts=prepared.token_counts, dense=Tensor.from_numpy(out))

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        release(self.device)

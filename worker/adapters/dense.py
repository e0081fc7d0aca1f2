"""Dense embeddings (worker process): transformers encoder, pooling (mean, CLS, last) and L2 normalisation.

Pooling and normalisation default to what the checkpoint's sentence-transformers files say (`modules.json`,
`1_Pooling/config.json`, `sentence_bert_config.json`); model-config options override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from sie_worker.adapters.base import LoadInfo, Prepared, UnsupportedTask
from sie_worker.adapters.torch_common import (
    Stopwatch,
    compute_dtype,
    memory_bytes,
    read_json,
    release,
    to_device,
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
        self.pooling = str(spec.loadtime.get("pooling") or spec.runtime.get("pooling") or defaults.get("pooling", "mean"))
        normalize = spec.loadtime.get("normalize", spec.runtime.get("normalize"))
        self.normalize = bool(defaults.get("normalize", False) if normalize is None else normalize)

    def load(self) -> LoadInfo:
        self.tokenizer = AutoTokenizer.from_pretrained(self.weights_dir, local_files_only=True)
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        model = AutoModel.from_pretrained(self.weights_dir, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        if self.max_length is None:
            self.max_length = min(int(self.tokenizer.model_max_length), 512)
        dim = int(self.model.config.hidden_size)
        return LoadInfo(dims={"dense": dim}, capabilities=["dense"], max_sequence_length=self.max_length)

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        clock = Stopwatch()
        texts = [item.text or "" for item in batch.items]
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        counts = encoded["attention_mask"].sum(dim=1).tolist()
        return Prepared(batch=batch, inputs=dict(encoded), token_counts=counts, tokenize_ms=clock.ms())

    def forward(self, prepared: Prepared) -> EncodeResult:
        batch = prepared.batch
        assert isinstance(batch, EncodeBatch)
        pooling = str(batch.options.get("pooling", self.pooling))
        normalize = bool(batch.options.get("normalize", self.normalize))
        inputs = to_device(prepared.inputs, self.device)
        with torch.inference_mode():
            hidden = self.model(**inputs).last_hidden_state
            vectors = pool(hidden, inputs["attention_mask"], pooling).float()
            if normalize:
                vectors = F.normalize(vectors, p=2, dim=1)
        return EncodeResult(token_counts=prepared.token_counts, dense=Tensor.from_numpy(vectors.cpu().numpy()))

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        release(self.device)

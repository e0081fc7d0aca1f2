"""Deterministic fake model (worker process), for pool and router tests only; it never imports torch.

Vectors and scores are seeded from a hash of the input. Faults are injected through `loadtime` options:
`load_delay_s`, `fail_load` (a message), `batch_delay_s`, `oom_on_batch`, `cuda_error_on_batch` (from that batch on,
as a broken CUDA context does) and `crash_on_batch` (1-based batch numbers), `memory_mb` (MiB to hold from load, so
memory budgets can be exercised) and `grow_mb_per_batch` (MiB more held after every batch, as a working set that grows
under traffic).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import numpy as np
import psutil

from sie_sdk.types import Classification
from sie_worker.adapters.base import LoadInfo, Prepared
from sie_worker.protocol import (
    EncodeBatch,
    EncodeResult,
    ExtractBatch,
    ExtractItem,
    ExtractResult,
    Result,
    ScoreBatch,
    ScoreResult,
    Tensor,
    WorkerSpec,
)


class InjectedOutOfMemory(RuntimeError):
    """Raised on the configured batch, with the message torch uses, so the worker maps it the same way."""


class AcceleratorError(RuntimeError):
    """Named and worded as torch's `torch.AcceleratorError`, which is what an illegal memory access raises."""


def fake_vector(text: str, dim: int) -> np.ndarray:
    """The unit vector the fake model returns for `text`: a pure function, so tests can compute it too."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


class FakeAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.options: dict[str, Any] = spec.loadtime
        self.dim = int(self.options.get("dim", 16))
        self.batches = 0
        self._ballast = b""
        self._grown: list[bytes] = []

    def load(self) -> LoadInfo:
        time.sleep(float(self.options.get("load_delay_s", 0)))
        if self.options.get("fail_load"):
            raise RuntimeError(str(self.options["fail_load"]))
        # Written, not just allocated, so the pages are resident and show in RSS.
        self._ballast = b"\x01" * (int(self.options.get("memory_mb", 0)) * 1024 * 1024)
        return LoadInfo(dims={"dense": self.dim}, capabilities=["dense", "score", "extract"], max_sequence_length=512)

    def prepare(self, batch: Any) -> Prepared:
        return Prepared(batch=batch)

    def forward(self, prepared: Prepared) -> Result:
        self.batches += 1
        if self.batches == self.options.get("crash_on_batch"):
            os._exit(3)
        if self.batches == self.options.get("oom_on_batch"):
            raise InjectedOutOfMemory("CUDA out of memory (injected by the fake adapter)")
        if self.batches >= self.options.get("cuda_error_on_batch", float("inf")):
            raise AcceleratorError("CUDA error: an illegal memory access was encountered (injected)")
        time.sleep(float(self.options.get("batch_delay_s", 0)))
        self._grown.append(b"\x01" * (int(self.options.get("grow_mb_per_batch", 0)) * 1024 * 1024))
        batch = prepared.batch
        if isinstance(batch, EncodeBatch):
            texts = [item.text or "" for item in batch.items]
            dense = np.stack([fake_vector(t, self.dim) for t in texts]) if texts else np.zeros((0, self.dim))
            return EncodeResult(token_counts=[len(t.split()) for t in texts], dense=Tensor.from_numpy(dense))
        if isinstance(batch, ScoreBatch):
            raw = np.array([float(fake_vector(q + "\x00" + d, 1)[0]) for q, d in batch.pairs], dtype=np.float32)
            scores = 1.0 / (1.0 + np.exp(-raw))
            counts = [len(q.split()) + len(d.split()) for q, d in batch.pairs]
            return ScoreResult(scores=Tensor.from_numpy(scores), raw=Tensor.from_numpy(raw), token_counts=counts)
        assert isinstance(batch, ExtractBatch)
        items = [ExtractItem(classifications=[Classification(label=label, score=1.0 / len(batch.labels))
                                              for label in batch.labels]) for _ in batch.items]
        return ExtractResult(items=items, token_counts=[len((i.text or "").split()) for i in batch.items])

    def memory_bytes(self) -> int:
        return int(psutil.Process(os.getpid()).memory_info().rss)

    def close(self) -> None:
        self._ballast = b""
        self._grown.clear()

"""Deterministic fake model (worker process), for pool and router tests only; it never imports torch.

Vectors and scores are seeded from a hash of the input. Faults are injected through `loadtime` options:
`load_delay_s`, `fail_load` (a message), `fail_loads` with `fail_loads_file` (the first that many loads fail with
EMFILE, a transient OS error; the file counts loads across worker processes), `batch_delay_s`,
`batch_delay_per_item_s`, `oom_on_batch`, `cuda_error_on_batch` (from that batch on, as a broken CUDA context does)
and `crash_on_batch` (1-based batch numbers), `oom_over_items` (a batch of more items runs out of memory),
`memory_mb` (MiB to hold from load, so memory budgets can be exercised) and `grow_mb_per_batch` (MiB more held after
every batch, as a working set that grows under traffic).
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from sie_sdk.types import Classification
from sie_worker.adapters.base import LoadInfo, OutOfMemory, Prepared
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


class InjectedOutOfMemory(OutOfMemory):
    """Raised on the configured batch; the worker maps it as it maps torch's OOM."""


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
        self._fail_transiently()
        # Written, not just allocated, so the pages are resident and show in RSS.
        self._ballast = b"\x01" * (int(self.options.get("memory_mb", 0)) * 1024 * 1024)
        return LoadInfo(dims={"dense": self.dim}, capabilities=["dense", "score", "extract"], max_sequence_length=512)

    def _fail_transiently(self) -> None:
        counter, failures = self.options.get("fail_loads_file"), int(self.options.get("fail_loads", 0))
        if not counter or not failures:
            return
        path = Path(counter)
        done = int(path.read_text() or 0) if path.exists() else 0
        if done < failures:
            path.write_text(str(done + 1))
            raise OSError(errno.EMFILE, "Too many open files (injected by the fake adapter)")

    def prepare(self, batch: Any) -> Prepared:
        return Prepared(batch=batch)

    def forward(self, prepared: Prepared) -> Result:
        self.batches += 1
        if self.batches == self.options.get("crash_on_batch"):
            os._exit(3)
        if self.batches >= self.options.get("cuda_error_on_batch", float("inf")):
            raise AcceleratorError("CUDA error: an illegal memory access was encountered (injected)")
        batch = prepared.batch
        size = len(batch.pairs) if isinstance(batch, ScoreBatch) else len(batch.items)
        if self.batches == self.options.get("oom_on_batch") or size > self.options.get("oom_over_items", size):
            raise InjectedOutOfMemory(f"out of memory on a batch of {size} (injected by the fake adapter)")
        per_item = float(self.options.get("batch_delay_per_item_s", 0))
        time.sleep(float(self.options.get("batch_delay_s", 0)) + size * per_item)
        self._grown.append(b"\x01" * (int(self.options.get("grow_mb_per_batch", 0)) * 1024 * 1024))
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

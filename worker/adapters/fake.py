"""Deterministic fake model (worker process), for pool and router tests only; it never imports torch.

Vectors and scores are seeded from a hash of the input. Faults are injected through its options (`FakeOptions` in the
protocol): delays, failed loads (`fail_loads` counts transient EMFILE failures across worker processes in a file),
crashes, OOMs and CUDA errors on given batches, and memory held from load (`memory_mb`, so budgets can be exercised)
or grown after every batch (`grow_mb_per_batch`, a working set that grows under traffic).
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
from sie_worker.adapters import graph_cache
from sie_worker.adapters.base import LoadInfo, OutOfMemory, Prepared
from sie_worker.options import FakeOptions
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
        self.options = spec.options_as(FakeOptions)
        self.dim = self.options.dim
        self.batches = 0
        self._ballast = b""
        self._grown: list[bytes] = []

    def load(self) -> LoadInfo:
        if self.options.announce_export and graph_cache.on_export_start is not None:
            graph_cache.on_export_start()
        time.sleep(self.options.load_delay_s)
        if self.options.fail_load:
            raise RuntimeError(self.options.fail_load)
        self._fail_transiently()
        # Written, not just allocated, so the pages are resident and show in RSS.
        self._ballast = b"\x01" * (self.options.memory_mb * 1024 * 1024)
        return LoadInfo(dims={"dense": self.dim}, capabilities=["dense", "score", "extract"], max_sequence_length=512,
                        engine="fake")

    def _fail_transiently(self) -> None:
        counter, failures = self.options.fail_loads_file, self.options.fail_loads
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
        options = self.options
        if self.batches == options.crash_on_batch:
            os._exit(3)
        if options.cuda_error_on_batch is not None and self.batches >= options.cuda_error_on_batch:
            raise AcceleratorError("CUDA error: an illegal memory access was encountered (injected)")
        batch = prepared.batch
        size = len(batch.pairs) if isinstance(batch, ScoreBatch) else len(batch.items)
        if self.batches == options.oom_on_batch or size > (options.oom_over_items or size):
            raise InjectedOutOfMemory(f"out of memory on a batch of {size} (injected by the fake adapter)")
        time.sleep(options.batch_delay_s + size * options.batch_delay_per_item_s)
        self._grown.append(b"\x01" * (options.grow_mb_per_batch * 1024 * 1024))
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

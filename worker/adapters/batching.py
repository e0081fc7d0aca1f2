"""Micro-batching shared by every adapter (worker process), free of torch so that the lean ONNX workers use it too:
length buckets cut by compute cost, padding multiples, the lanes split, and small file and clock helpers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

# The most items in one forward pass inside a router batch on the CPU (`length_buckets` picks how many, up to this).
# On a GPU the token budget alone sizes a forward: a row cap of 32 gave an H100 about 500 tokens per call for short
# texts; GPU_MICRO_BATCH_ITEMS only bounds the bookkeeping.
MICRO_BATCH_ITEMS = 32
GPU_MICRO_BATCH_ITEMS = 4096
# The fixed cost of one forward call, in padded tokens' worth of compute: measured for MiniLM on 2 cores under ONNX
# Runtime (about 0.8 ms a call against 65 us a token; bench/README.md). On a GPU a call costs far more than a token,
# so buckets there are as large as the limits allow.
CPU_CALL_OVERHEAD_TOKENS = 24
GPU_CALL_OVERHEAD_TOKENS = 4096
# Padded lengths are rounded up to a multiple of this: few distinct shapes keep the kernel caches (oneDNN's
# primitive cache, cuBLAS plans) small and warm, for a few pad tokens per row.
PAD_MULTIPLE = 8


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or not JSON."""
    try:
        with path.open() as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Stopwatch:
    """Milliseconds since construction."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def ms(self) -> float:
        return (time.perf_counter() - self._start) * 1000.0


def micro_batch_items(device_type: str) -> int:
    """The most rows in one forward call on this kind of device ("cuda" or "cpu")."""
    return GPU_MICRO_BATCH_ITEMS if device_type == "cuda" else MICRO_BATCH_ITEMS


def padded(length: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-length // multiple) * multiple


def length_buckets(lengths: list[int], max_items: int, max_tokens: int,
                   call_overhead_tokens: int = CPU_CALL_OVERHEAD_TOKENS,
                   pad_multiple: int = PAD_MULTIPLE) -> list[list[int]]:
    """Item indices sorted by length and cut into the micro-batches that cost the least compute to run.

    A micro-batch costs a fixed overhead per forward call plus its padded tokens (rows x longest, rounded up to
    `pad_multiple`). Sorting first makes the best cut a contiguous run of the sorted order, so a dynamic programme over
    cut points finds it exactly in O(n * max_items). Cheap calls (CPU) give many small buckets of near-equal length;
    expensive ones (GPU) give few full buckets. Against fixed buckets of 16 this is worth 15-25% on CPU at 16-64
    items per batch (bench/README.md, "micro-batches").
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sizes = [padded(max(1, lengths[i]), pad_multiple) for i in order]
    best = [0] + [0] * len(order)  # best[end]: least cost of the first `end` sorted items
    cut = [0] * (len(order) + 1)  # cut[end]: where the last bucket of that best split starts
    for end in range(1, len(order) + 1):
        longest = sizes[end - 1]  # ascending, so the last item of a bucket is its longest
        rows_allowed = max(1, min(max_items, max_tokens // longest))
        best[end], cut[end] = min((best[start] + call_overhead_tokens + (end - start) * longest, start)
                                  for start in range(max(0, end - rows_allowed), end))
    buckets: list[list[int]] = []
    end = len(order)
    while end:
        buckets.append(order[cut[end]:end])
        end = cut[end]
    return buckets[::-1]


# A padded micro-batch: input name -> rows (torch tensors in the torch adapters, numpy arrays in the lean ones).
Bucket = tuple[list[int], dict[str, Any]]


def split_for_lanes(buckets: list[Bucket], lanes: int) -> list[Bucket]:
    """At least `lanes` buckets where there are rows enough, so that every lane has work: the bucket with the most
    rows is halved until there are (none stay none). Rows keep their bucket's padding."""
    buckets = list(buckets)
    while buckets and len(buckets) < lanes:
        largest = max(range(len(buckets)), key=lambda i: len(buckets[i][0]))
        indices, tensors = buckets[largest]
        if len(indices) < 2:
            break
        half = len(indices) // 2
        buckets[largest:largest + 1] = [(indices[:half], {k: v[:half] for k, v in tensors.items()}),
                                        (indices[half:], {k: v[half:] for k, v in tensors.items()})]
    return buckets



"""Micro-batch cutting in the worker: the dynamic programme finds the cheapest split, within the limits."""

from __future__ import annotations

import itertools
import random

import torch

from sie_worker.adapters.torch_common import (
    CPU_CALL_OVERHEAD_TOKENS,
    GPU_CALL_OVERHEAD_TOKENS,
    length_buckets,
    padded,
    split_for_lanes,
)


def cost(buckets: list[list[int]], lengths: list[int], overhead: int) -> int:
    return sum(overhead + len(b) * max(padded(lengths[i]) for i in b) for b in buckets)


def cheapest_by_brute_force(lengths: list[int], max_items: int, max_tokens: int, overhead: int) -> int:
    """Every way of cutting the sorted order into contiguous runs (the DP's search space), priced."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = None
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        buckets, current = [], [order[0]]
        for index, cut in zip(order[1:], cuts, strict=True):
            if cut:
                buckets.append(current)
                current = []
            current.append(index)
        buckets.append(current)
        if any(len(b) > max_items or (len(b) > 1 and len(b) * padded(lengths[b[-1]]) > max_tokens)
               for b in buckets):
            continue
        price = cost(buckets, lengths, overhead)
        best = price if best is None else min(best, price)
    assert best is not None
    return best


def test_the_split_is_the_cheapest_one_and_covers_every_item_once() -> None:
    rng = random.Random(7)
    for _ in range(200):
        lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 9))]
        max_items, max_tokens = rng.randint(1, 6), rng.choice([64, 256, 4096])
        overhead = rng.choice([0, CPU_CALL_OVERHEAD_TOKENS, 200])
        buckets = length_buckets(lengths, max_items, max_tokens, overhead)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
        assert all(len(b) <= max_items for b in buckets)
        assert all(len(b) == 1 or len(b) * max(padded(lengths[i]) for i in b) <= max_tokens for b in buckets)
        assert cost(buckets, lengths, overhead) == cheapest_by_brute_force(lengths, max_items, max_tokens, overhead)


def test_cpu_splits_mixed_lengths_and_gpu_fills_its_buckets() -> None:
    lengths = [12] * 8 + [60] * 8
    cpu = length_buckets(lengths, 32, 16384, CPU_CALL_OVERHEAD_TOKENS)
    assert sorted(map(sorted, cpu)) == [list(range(8)), list(range(8, 16))]  # no short text padded to 64
    assert length_buckets(lengths, 32, 16384, GPU_CALL_OVERHEAD_TOKENS) == [sorted(range(16), key=lengths.__getitem__)]
    assert [len(b) for b in length_buckets(lengths, 4, 16384, GPU_CALL_OVERHEAD_TOKENS)] == [4, 4, 4, 4]


def test_a_text_longer_than_the_token_budget_runs_alone() -> None:
    assert length_buckets([500, 10, 10], 16, 256, GPU_CALL_OVERHEAD_TOKENS) == [[1, 2], [0]]


def test_every_lane_gets_a_bucket_when_there_are_rows_enough() -> None:
    rows = torch.arange(5).unsqueeze(1).repeat(1, 8)  # row i holds i, so each split keeps its own rows
    split = split_for_lanes([([10, 11, 12, 13, 14], {"input_ids": rows})], 4)
    assert [indices for indices, _ in split] == [[10], [11], [12], [13, 14]]
    for indices, tensors in split:
        assert [10 + int(v) for v in tensors["input_ids"][:, 0]] == indices
    lone = [([7], {"input_ids": rows[:1]})]
    assert split_for_lanes(lone, 2) == lone  # one row cannot be shared
    assert split_for_lanes([], 2) == []  # a batch with no texts (CLIP's images alone) has no calls

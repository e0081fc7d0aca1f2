"""From API calls to worker batches and back (router process).

Every route calls `Service.encode`, `score` or `extract` with inputs already validated; the service applies the
model config (templates, options), queues the items on the model's batcher and splits batch results per item.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from sie_router.batcher import Batcher, BatchLimits
from sie_router.errors import SIEError
from sie_router.pacing import BatchReport
from sie_router.pool import WorkerPool
from sie_router.registry import ModelConfig
from sie_router.settings import Settings
from sie_worker.protocol import (
    BatchDone,
    EncodeBatch,
    EncodeResult,
    ExtractBatch,
    ExtractItem,
    ExtractResult,
    InputItem,
    ScoreBatch,
    ScoreResult,
)

# Options the router consumes itself; everything else in the merged options goes to the worker.
ROUTER_OPTIONS = frozenset({"is_query", "profile", "output_types", "output_dtype", "instruction", "query_template",
                            "doc_template", "default_instruction"})


@dataclass
class EncodedItem:
    """One item's encode outputs, float32, before quantisation."""

    tokens: int
    dense: np.ndarray | None = None
    sparse: tuple[np.ndarray, np.ndarray] | None = None
    multivector: np.ndarray | None = None


@dataclass
class EncodePlan:
    """What an encode call asks of the model, after merging the profile's runtime options with the request's."""

    output_types: list[str]
    is_query: bool = False
    instruction: str | None = None
    worker_options: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)


def estimate_tokens(item: InputItem) -> int:
    """Batch cost without a tokenizer in the router: about four characters a token; an image costs a constant."""
    return 2 + len(item.text or "") // 4 + 256 * len(item.images)


def apply_template(text: str, runtime: dict[str, Any], is_query: bool, instruction: str | None) -> str:
    template = runtime.get("query_template" if is_query else "doc_template")
    if not template:
        return text
    instruction = instruction or runtime.get("default_instruction") or ""
    return str(template).replace("{instruction}", instruction).replace("{text}", text)


def _options_key(options: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(dict(sorted(options.items())))


def split_encode(result: EncodeResult, count: int) -> list[EncodedItem]:
    dense = result.dense.numpy() if result.dense is not None else None
    out = [EncodedItem(tokens=result.token_counts[i], dense=None if dense is None else dense[i]) for i in range(count)]
    if result.sparse_indices is not None and result.sparse_values is not None and result.sparse_offsets:
        indices, values, offsets = result.sparse_indices.numpy(), result.sparse_values.numpy(), result.sparse_offsets
        for i, item in enumerate(out):
            item.sparse = (indices[offsets[i]:offsets[i + 1]], values[offsets[i]:offsets[i + 1]])
    if result.multivector is not None and result.multivector_offsets:
        rows, offsets = result.multivector.numpy(), result.multivector_offsets
        for i, item in enumerate(out):
            item.multivector = rows[offsets[i]:offsets[i + 1]]
    return out


def report(done: BatchDone, outputs: list[Any]) -> BatchReport:
    """The batcher's view of a finished batch: its outputs and how long the worker's model spent on it."""
    timing = done.timing
    return BatchReport(outputs, busy_s=(timing.inference_ms + timing.postprocess_ms) / 1000.0,
                       prepare_s=timing.tokenize_ms / 1000.0)


class Service:
    def __init__(self, settings: Settings, pool: WorkerPool) -> None:
        self.settings = settings
        self.pool = pool
        self.batchers: dict[str, Batcher] = {}

    def batcher(self, config: ModelConfig) -> Batcher:
        found = self.batchers.get(config.sie_id)
        if found is None:
            limits = BatchLimits(max_items=self.settings.max_batch_items,
                                 max_tokens=config.profiles["default"].max_batch_tokens or 16384,
                                 max_wait_ms=self.settings.max_wait_ms, max_queue_items=self.settings.max_queue_items)
            found = Batcher(config.sie_id, lambda key, items: self._run(config.sie_id, key, items), limits)
            found.start()
            self.batchers[config.sie_id] = found
            self.pool.slots[config.sie_id].batcher = found
        return found

    def admit(self, count: int) -> None:
        """Refuse work past the server-wide queue bound (retryable), whatever model it is for."""
        queued = sum(b.queued_items for b in self.batchers.values())
        if queued + count > self.settings.max_total_queue_items:
            raise SIEError("QUEUE_FULL", f"the server has {queued} items queued across its models; retry shortly")

    async def _run(self, model: str, key: tuple[Any, ...], items: list[Any]) -> BatchReport:
        worker = await self.pool.ensure(model, wait_s=None)
        kind = key[0]
        if kind == "encode":
            _, output_types, is_query, options = key
            opts = msgspec.msgpack.decode(options)
            done = await self.pool.run_batch(worker, lambda bid: EncodeBatch(
                batch_id=bid, items=items, output_types=list(output_types), is_query=is_query, options=opts),
                len(items))
            assert isinstance(done.result, EncodeResult)
            return report(done, split_encode(done.result, len(items)))
        if kind == "score":
            opts = msgspec.msgpack.decode(key[1])
            done = await self.pool.run_batch(worker, lambda bid: ScoreBatch(batch_id=bid, pairs=items, options=opts),
                                             len(items))
            assert isinstance(done.result, ScoreResult)
            scores, raw, counts = done.result.scores.numpy(), done.result.raw.numpy(), done.result.token_counts
            return report(done, [(float(scores[i]), float(raw[i]), counts[i]) for i in range(len(items))])
        _, labels, options = key
        done = await self.pool.run_batch(worker, lambda bid: ExtractBatch(
            batch_id=bid, items=items, labels=list(labels), options=msgspec.msgpack.decode(options)), len(items))
        assert isinstance(done.result, ExtractResult)
        return report(done, list(zip(done.result.items, done.result.token_counts, strict=True)))

    async def _ready(self, model: str, wait_s: float | None) -> ModelConfig:
        await self.pool.ensure(model, wait_s)
        return self.pool.slot(model).config

    async def encode(self, model: str, items: list[InputItem], plan: EncodePlan,
                     wait_s: float | None) -> list[EncodedItem]:
        config = await self._ready(model, wait_s)
        templated = [InputItem(text=None if i.text is None else apply_template(i.text, plan.runtime, plan.is_query,
                                                                               plan.instruction), images=i.images)
                     for i in items]
        key = ("encode", tuple(sorted(plan.output_types)), plan.is_query, _options_key(plan.worker_options))
        self.admit(len(items))
        outputs: list[EncodedItem] = await self.batcher(config).submit(
            key, templated, [estimate_tokens(i) for i in templated])
        return outputs

    async def score(self, model: str, query: str, documents: list[str], options: dict[str, Any],
                    wait_s: float | None) -> list[tuple[float, float, int]]:
        config = await self._ready(model, wait_s)
        pairs = [(query, doc) for doc in documents]
        costs = [2 + (len(query) + len(doc)) // 4 for doc in documents]
        self.admit(len(pairs))
        scores: list[tuple[float, float, int]] = await self.batcher(config).submit(
            ("score", _options_key(options)), pairs, costs)
        if not all(np.isfinite(s) for s, _, _ in scores):
            raise SIEError("INFERENCE_ERROR", "the model produced a non-finite score")
        return scores

    async def extract(self, model: str, items: list[InputItem], labels: list[str], options: dict[str, Any],
                      wait_s: float | None) -> list[tuple[ExtractItem, int]]:
        config = await self._ready(model, wait_s)
        key = ("extract", tuple(labels), _options_key(options))
        self.admit(len(items))
        found: list[tuple[ExtractItem, int]] = await self.batcher(config).submit(
            key, items, [estimate_tokens(i) * max(1, len(labels)) for i in items])
        return found

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.batchers.values()))

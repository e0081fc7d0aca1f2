"""From jobs to worker batches and back (router process).

Every route decodes its request into a job (`sie_router.pipeline.jobs`) and calls `Service.run`; the service queues
the job's items on its model's batcher under the job's `BatchKey`, and each batch's outputs come back as array
slices.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sie_router.errors import SIEError
from sie_router.models.config import ModelConfig
from sie_router.pipeline.jobs import BatchKey, Encoded, EncodeJob, ExtractJob, Job, Scored, ScoreJob, TokenizeJob, thaw
from sie_router.pool.batcher import Batcher, BatchLimits
from sie_router.pool.pacing import BatchReport
from sie_router.pool.pool import WorkerPool
from sie_router.request_labels import note_inputs
from sie_router.settings import Settings
from sie_router.telemetry import Tracing
from sie_sdk.codes import ErrorCode
from sie_worker.protocol import (
    BatchDone,
    DecodeBatch,
    EncodeBatch,
    EncodeResult,
    ExtractBatch,
    ExtractResult,
    InputItem,
    Message,
    ScoreBatch,
    ScoreResult,
    TokenizeBatch,
    TokenizeResult,
)


def estimate_tokens(item: InputItem) -> int:
    """Batch cost without a tokenizer in the router: about four characters a token; an image costs a constant."""
    return 2 + len(item.text or "") // 4 + 256 * len(item.images)


def report(done: BatchDone, outputs: Any) -> BatchReport:
    """The batcher's view of a finished batch: its outputs and how long the worker's model spent on it."""
    timing = done.timing
    return BatchReport(outputs, busy_s=(timing.inference_ms + timing.postprocess_ms) / 1000.0,
                       prepare_s=timing.tokenize_ms / 1000.0)


def _message(batch_id: int, key: BatchKey, items: list[Any], trace: str | None = None) -> Message:
    options = thaw(key.options)
    if key.op == "encode":
        return EncodeBatch(batch_id=batch_id, items=items, output_types=list(key.output_types), is_query=key.is_query,
                           options=options, trace=trace)
    if key.op == "score":
        return ScoreBatch(batch_id=batch_id, pairs=items, options=options, trace=trace)
    return ExtractBatch(batch_id=batch_id, items=items, labels=list(key.labels), options=options, trace=trace)


def _outputs(done: BatchDone) -> Any:
    result = done.result
    if isinstance(result, EncodeResult):
        return Encoded.from_result(result)
    if isinstance(result, ScoreResult):
        return Scored.from_result(result)
    assert isinstance(result, ExtractResult)
    return list(zip(result.items, result.token_counts, strict=True))


def _inputs(job: Job) -> int:
    """How many inputs a job carries (its request's trace span says it)."""
    if isinstance(job, ScoreJob):
        return len(job.documents)
    if isinstance(job, TokenizeJob):
        return len(job.texts or job.ids)
    return len(job.items)


class Service:
    def __init__(self, settings: Settings, pool: WorkerPool, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.tracing = tracing  # None while tracing is off
        self.batchers: dict[str, Batcher] = {}

    def batcher(self, config: ModelConfig) -> Batcher:
        found = self.batchers.get(config.sie_id)
        if found is None:
            limits = BatchLimits(max_items=self.settings.max_batch_items,
                                 max_tokens=config.profiles["default"].max_batch_tokens or 16384,
                                 max_wait_ms=self.settings.max_wait_ms, max_queue_items=self.settings.max_queue_items)
            found = Batcher(config.sie_id, lambda key, items: self._run(config.sie_id, key, items), limits,
                            tracing=self.tracing)
            found.start()
            self.batchers[config.sie_id] = found
            self.pool.slots[config.sie_id].batcher = found
        return found

    def admit(self, count: int) -> None:
        """Refuse work past the server-wide queue bound (retryable), whatever model it is for."""
        queued = sum(b.queued_items for b in self.batchers.values())
        if queued + count > self.settings.max_total_queue_items:
            raise SIEError(ErrorCode.QUEUE_FULL,
                           f"the server has {queued} items queued across its models; retry shortly")

    async def _run(self, model_key: str, key: BatchKey, items: list[Any]) -> BatchReport:
        worker = await self.pool.ensure(model_key, wait_s=None)
        trace = self.tracing.traceparent() if self.tracing is not None else None  # the batch span's, when tracing
        done = await self.pool.run_batch(worker, lambda bid: _message(bid, key, items, trace), len(items))
        return report(done, _outputs(done))

    async def _submit(self, config: ModelConfig, key: BatchKey, items: list[Any], costs: list[int]) -> Any:
        self.admit(len(items))
        return await self.batcher(config).submit(key, items, costs)

    async def run(self, job: Job) -> Any:
        """Run one job; the outputs of its items in order (`Encoded`, `Scored`, extractions or a tokenization)."""
        await self.pool.ensure(job.model.key, job.wait_s)
        config = job.model.config
        note_inputs(_inputs(job))
        match job:
            case EncodeJob():
                items = list(job.items)
                return await self._submit(config, job.key, items, [estimate_tokens(i) for i in items])
            case ScoreJob():
                pairs = [(job.query, doc) for doc in job.documents]
                costs = [2 + (len(job.query) + len(doc)) // 4 for doc in job.documents]
                scored: Scored = await self._submit(config, job.key, pairs, costs)
                if not np.isfinite(scored.scores).all():
                    raise SIEError(ErrorCode.INFERENCE_ERROR, "the model produced a non-finite score")
                return scored
            case ExtractJob():
                items = list(job.items)
                weight = max(1, len(job.key.labels))
                return await self._submit(config, job.key, items, [estimate_tokens(i) * weight for i in items])
            case TokenizeJob():
                return await self.tokenize(job)
        raise TypeError(f"not a job: {type(job).__name__}")

    async def tokenize(self, job: TokenizeJob) -> TokenizeResult:
        """Tokenize or decode outside the batcher: the worker answers it between batches, from its tokenizer."""
        worker = await self.pool.ensure(job.model.key, job.wait_s)
        make: Callable[[int], Message] = (
            (lambda bid: TokenizeBatch(batch_id=bid, texts=list(job.texts),
                                       add_special_tokens=job.add_special_tokens)) if job.texts else
            (lambda bid: DecodeBatch(batch_id=bid, ids=[list(i) for i in job.ids],
                                     skip_special_tokens=job.skip_special_tokens)))
        done = await self.pool.run_batch(worker, make, max(len(job.texts), len(job.ids)))
        assert isinstance(done.result, TokenizeResult)
        return done.result

    async def drain(self, key: str, deadline_s: float) -> bool:
        """Wait, up to the deadline, until a model's admitted requests have been answered; whether they were."""
        batcher = self.batchers.get(key)
        deadline = time.monotonic() + deadline_s
        while batcher is not None and not batcher.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return batcher is None or batcher.idle

    async def drop(self, key: str) -> None:
        """A removed model's queue: what is still in it fails MODEL_NOT_FOUND, and its task stops."""
        batcher = self.batchers.pop(key, None)
        if batcher is not None:
            batcher.fail_queued(SIEError(ErrorCode.MODEL_NOT_FOUND, f"model '{key}' was removed", param="model"))
            await batcher.close()

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.batchers.values()))

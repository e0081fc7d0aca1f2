"""From jobs to worker batches and back (router process).

Every route decodes its request into a job (`sie_router.pipeline.jobs`) and calls `Service.run`; the service makes
sure the model is loaded, once per job, queues the job's items on its model's queue (the pool's) under the job's
`BatchKey`, and each batch's outputs come back as array slices.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from sie_router.errors import SIEError
from sie_router.models.config import ModelConfig
from sie_router.pipeline.jobs import BatchKey, Encoded, EncodeJob, ExtractJob, Job, Scored, ScoreJob, TokenizeJob, thaw
from sie_router.pool.pacing import BatchReport
from sie_router.pool.pool import WorkerPool
from sie_router.pool.supervisor import Worker
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


def batch_costs(key: BatchKey, items: list[Any]) -> list[int]:
    """Each item's cost in a batch: its estimated tokens; a score pair's query and document; an extraction's times
    its labels, which the model reads beside it."""
    if key.op == "score":
        return [2 + (len(query) + len(doc)) // 4 for query, doc in items]
    weight = max(1, len(key.labels)) if key.op == "extract" else 1
    return [estimate_tokens(item) * weight for item in items]


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

    def admit(self, count: int) -> None:
        """Refuse work past the server-wide queue bound (retryable), whatever model it is for."""
        queued = self.pool.queued_items()
        if queued + count > self.settings.max_total_queue_items:
            raise SIEError(ErrorCode.QUEUE_FULL,
                           f"the server has {queued} items queued across its models; retry shortly")

    async def _run(self, model_key: str, key: BatchKey, items: list[Any]) -> BatchReport:
        """One batch of the model's queue, on the worker its jobs made sure of."""
        worker = self.pool.ready_worker(model_key)
        trace = self.tracing.traceparent() if self.tracing is not None else None  # the batch span's, when tracing
        done = await self.pool.run_batch(worker, lambda bid: _message(bid, key, items, trace), len(items),
                                         sum(batch_costs(key, items)))
        return report(done, _outputs(done))

    async def _submit(self, config: ModelConfig, key: BatchKey, items: list[Any]) -> Any:
        self.admit(len(items))
        queue = self.pool.queue(config.sie_id, partial(self._run, config.sie_id), self.tracing)
        return await queue.submit(key, items, batch_costs(key, items))

    async def run(self, job: Job) -> Any:
        """Run one job; the outputs of its items in order (`Encoded`, `Scored`, extractions or a tokenization)."""
        worker = await self.pool.ensure(job.model.key, job.wait_s)
        config = job.model.config
        note_inputs(_inputs(job))
        match job:
            case EncodeJob() | ExtractJob():
                return await self._submit(config, job.key, list(job.items))
            case ScoreJob():
                scored: Scored = await self._submit(config, job.key, [(job.query, doc) for doc in job.documents])
                if not np.isfinite(scored.scores).all():
                    raise SIEError(ErrorCode.INFERENCE_ERROR, "the model produced a non-finite score")
                return scored
            case TokenizeJob():
                return await self.tokenize(job, worker)
        raise TypeError(f"not a job: {type(job).__name__}")

    async def tokenize(self, job: TokenizeJob, worker: Worker) -> TokenizeResult:
        """Tokenize or decode outside the queue: the worker answers it between batches, from its tokenizer."""
        make: Callable[[int], Message] = (
            (lambda bid: TokenizeBatch(batch_id=bid, texts=list(job.texts),
                                       add_special_tokens=job.add_special_tokens)) if job.texts else
            (lambda bid: DecodeBatch(batch_id=bid, ids=[list(i) for i in job.ids],
                                     skip_special_tokens=job.skip_special_tokens)))
        # No forward pass: its cost is nil, so its deadline is the floor once the model's pace is known.
        done = await self.pool.run_batch(worker, make, max(len(job.texts), len(job.ids)), 0)
        assert isinstance(done.result, TokenizeResult)
        return done.result

"""Per-model batching (router process): TEI's queue, in asyncio.

Requests enqueue `Entry`s (a client batch is cut, in length order, into entries within the request item cap and the
token budget). One task per model forms batches:
  1. wait for an entry; while a batch runs, hold the next one back until the worker is about to need it (the
     `Pacer` learns when; `max_wait_ms` until it knows, 0 turns waiting off) or a full batch is waiting;
  2. take the oldest live entry, then fill from a bounded window of entries with the same batch key, closest in
     length first, so padding stays small, under the item cap and the token budget (one request's entry may hold more
     items than the item cap: it is never joined then);
  3. skip entries whose request has gone (its future was cancelled);
  4. keep at most `in_flight` batches at the worker, so the next batch is ready while one runs;
  5. if a shared batch fails on one request's input, re-run its requests one by one so only that one fails;
  6. if the worker runs out of device memory, run the batch again in halves before answering RESOURCE_EXHAUSTED.
The queue is bounded in items; past the bound `submit` raises `QUEUE_FULL` (retryable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sie_router import metrics
from sie_router.errors import SIEError
from sie_router.loops import Loop
from sie_router.pool.pacing import BatchReport, Pacer
from sie_router.telemetry import Tracing, Waiting
from sie_sdk.codes import ErrorCode
from sie_worker.options import MAX_BATCH_TOKENS

log = logging.getLogger("sie.batcher")

_WINDOW_FACTOR = 4  # how far past the batch size we look for similar lengths
# Failures caused by one request's input: a shared batch that fails so is re-run request by request.
INPUT_ERRORS = frozenset({ErrorCode.INVALID_INPUT, ErrorCode.INPUT_TOO_LONG, ErrorCode.INVALID_MEDIA})


@dataclass(eq=False)
class Entry:
    """Part of one request: items that must share a batch key, and the future for their outputs."""

    key: Any
    items: list[Any]
    costs: list[int]
    future: asyncio.Future[Any]
    cost: int = 0
    enqueued: float = field(default_factory=time.perf_counter)
    waiting: Waiting | None = None  # the request's trace context as it joined the queue, when tracing is on

    def __post_init__(self) -> None:
        self.cost = sum(self.costs)


RunBatch = Callable[[Any, list[Any]], Awaitable[BatchReport]]


# Items per batch where --max-batch-items is 0 (auto): this many on the CPU; on a GPU as many as the token budget
# holds at GPU_TOKENS_PER_ITEM tokens an item, so that short texts fill a GPU's forward.
CPU_BATCH_ITEMS = 64
GPU_TOKENS_PER_ITEM = 16
# On the CPU one client batch stays one batch up to this many items (and the token budget), while batches joined from
# separate requests stop at CPU_BATCH_ITEMS. The worker then buckets by length over the whole request, and its two
# streams wait for each other once per request instead of once per 64 items: b256c1 (a client sending 256 corpus
# sentences at a time) 364 -> 390-393 sentences/s through the server, and a batch of 64 runs at 369-383 sentences/s in
# process against 389-394 for 256 (bench/README.md, "one request, one batch"). Fairness is unchanged: the queue is
# FIFO, so a request arriving behind a client batch waited for all of it anyway. Joining more separate requests per
# batch (an item cap of 256) left c128's throughput as it was and its p99 413 -> 520 ms, so that cap stays at 64.
CPU_REQUEST_ITEMS = 256


def item_cap(setting: int, max_tokens: int, gpu: bool) -> int:
    """The most items in one batch: the setting when given, else the default above for the device kind."""
    if setting > 0:
        return setting
    return max(CPU_BATCH_ITEMS, max_tokens // GPU_TOKENS_PER_ITEM) if gpu else CPU_BATCH_ITEMS


def request_item_cap(setting: int, max_items: int, gpu: bool) -> int:
    """The most items of one client batch in one batch: the setting when given (it caps every batch), else the item
    cap on a GPU, and CPU_REQUEST_ITEMS on the CPU."""
    if setting > 0 or gpu:
        return max_items
    return max(max_items, CPU_REQUEST_ITEMS)


@dataclass
class BatchLimits:
    max_items: int = CPU_BATCH_ITEMS
    max_tokens: int = MAX_BATCH_TOKENS
    max_wait_ms: float = 2.0
    max_queue_items: int = 512
    in_flight: int = 2
    max_request_items: int = 0  # items of one client batch per entry; 0: max_items

    @property
    def request_items(self) -> int:
        return self.max_request_items or self.max_items


@dataclass
class Batcher:
    """The queue of one model. `run(key, items)` sends one batch to the worker and reports one output per item."""

    name: str
    run: RunBatch
    limits: BatchLimits
    tracing: Tracing | None = None
    queue: deque[Entry] = field(default_factory=deque)
    queued_items: int = 0
    pacer: Pacer = field(default_factory=Pacer)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _slots: asyncio.Semaphore | None = None
    _loop_task: Loop | None = None
    _running: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch at the worker."""
        return not self.queue and not self._running

    def start(self) -> None:
        self._slots = asyncio.Semaphore(self.limits.in_flight)
        # Supervised: should forming a batch ever raise, the loop is logged and restarted, and the queue keeps moving.
        self._loop_task = Loop(self._loop, f"sie-batcher:{self.name}", f"the queue of model '{self.name}'")
        self._loop_task.start()

    async def submit(self, key: Any, items: list[Any], costs: list[int]) -> Any:
        """Queue the items (cut into `entries`) and return their outputs in order: a list, or the batch outputs' own
        type when it has `join` (slices of one array, never row by row)."""
        if len(items) > self.limits.max_queue_items:
            raise SIEError(ErrorCode.INVALID_INPUT, f"{len(items)} items is more than this model's queue can ever hold "
                           f"({self.limits.max_queue_items}); split the request", param="items")
        if self.queued_items + len(items) > self.limits.max_queue_items:
            raise SIEError(ErrorCode.QUEUE_FULL,
                           f"model '{self.name}' has {self.queued_items} items queued; retry shortly")
        loop = asyncio.get_running_loop()
        # A big client batch is cut in length order, so each entry pads little; outputs are put back in order below.
        order = sorted(range(len(items)), key=costs.__getitem__)
        waiting = self.tracing.waiting() if self.tracing is not None else None
        entries = [Entry(key, [items[j] for j in part], [costs[j] for j in part], loop.create_future(), waiting=waiting)
                   for part in self._cut(order, costs)]
        self.queue.extend(entries)
        self._set_queued(self.queued_items + len(items))
        self._wakeup.set()
        try:
            parts = await asyncio.gather(*(e.future for e in entries))
        except BaseException:
            for entry in entries:
                if entry.future.done() and not entry.future.cancelled():
                    entry.future.exception()  # mark sibling failures as seen
                entry.future.cancel()  # still queued ones are skipped, never sent
            raise
        if not isinstance(parts[0], list):  # array outputs (`sie_router.pipeline.jobs`) put themselves back in order
            return type(parts[0]).join(parts, order)  # type: ignore[no-any-return]
        outputs: list[Any] = [None] * len(items)
        for position, output in zip(order, (out for part in parts for out in part), strict=True):
            outputs[position] = output
        return outputs

    def _cut(self, order: list[int], costs: list[int]) -> list[list[int]]:
        """A client batch's item indices (in length order) cut into entries of at most `request_items` items and,
        unless one item alone is over it, of at most `max_tokens` tokens."""
        parts: list[list[int]] = [[]]
        tokens = 0
        for index in order:
            part = parts[-1]
            if part and (len(part) >= self.limits.request_items or tokens + costs[index] > self.limits.max_tokens):
                parts.append(part := [])
                tokens = 0
            part.append(index)
            tokens += costs[index]
        return parts

    def _take(self) -> list[Entry]:
        """Step 2: the oldest live entry plus similar-length entries of the same key, within the limits. The batch is
        chosen before any entry leaves the queue, so a failure while choosing loses no request."""
        while self.queue and self.queue[0].future.done():
            self._drop(self.queue.popleft())
        if not self.queue:
            return []
        head = self.queue[0]
        batch, items, tokens = [head], len(head.items), head.cost
        window = [e for e in itertools_islice(self.queue, 1 + self.limits.max_items * _WINDOW_FACTOR)[1:]
                  if e.key == head.key and not e.future.done()]
        head_len = head.cost / max(1, len(head.items))
        window.sort(key=lambda e: abs(e.cost / max(1, len(e.items)) - head_len))
        for entry in window:
            if items + len(entry.items) > self.limits.max_items or tokens + entry.cost > self.limits.max_tokens:
                continue
            batch.append(entry)
            items += len(entry.items)
            tokens += entry.cost
        self.queue.popleft()
        for entry in batch[1:]:
            self.queue.remove(entry)
        self._set_queued(self.queued_items - items)
        return batch

    def _set_queued(self, count: int) -> None:
        self.queued_items = count
        metrics.QUEUE_DEPTH.labels(self.name).set(count)

    def _full_batch_waiting(self) -> bool:
        live = [e for e in self.queue if not e.future.done()]
        return (sum(len(e.items) for e in live) >= self.limits.max_items
                or sum(e.cost for e in live) >= self.limits.max_tokens)

    def _drop(self, entry: Entry) -> None:
        self._set_queued(self.queued_items - len(entry.items))

    async def _loop(self) -> None:
        assert self._slots is not None
        while True:
            if not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._fill()
            await self._slots.acquire()
            try:
                batch = self._take()
            except BaseException:
                self._slots.release()  # the slot was never used: a restarted loop finds it free
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._dispatch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _fill(self) -> None:
        """Step 1: the worker is busy anyway, so the requests that arrive before it needs the next batch join it
        for free. An idle worker gets work at once, so a lone request pays no batching delay."""
        if self.limits.max_wait_ms <= 0:
            return
        fallback = time.perf_counter() + self.limits.max_wait_ms / 1000
        while self._running and not self._full_batch_waiting():
            send_by = self.pacer.send_by()
            wait = (fallback if send_by is None else send_by) - time.perf_counter()
            if wait <= 0:
                return
            self._wakeup.clear()  # set again by a new request or a finished batch
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait)

    async def _dispatch(self, batch: list[Entry]) -> None:
        assert self._slots is not None
        self._observe(batch)
        sent = self.pacer.sent(sum(e.cost for e in batch))
        report = None
        try:
            with (self.tracing.batch(self.name, [e.waiting for e in batch], sum(len(e.items) for e in batch))
                  if self.tracing is not None else contextlib.nullcontext()):
                report = await self._run_entries(batch, isolate=True)
        finally:
            self.pacer.done(sent, report)
            self._slots.release()
            self._wakeup.set()

    async def _run_entries(self, batch: list[Entry], *, isolate: bool) -> BatchReport | None:
        """Run entries as one batch, and return its report (None when it failed or was split). If the batch fails
        on one request's input (a corrupt image, an over-long text), run each request on its own, so only the
        offending request fails and its neighbours succeed."""
        try:
            report = await self._run_halving(batch[0].key, [item for e in batch for item in e.items])
        except SIEError as exc:
            if isolate and len(batch) > 1 and exc.code in INPUT_ERRORS:
                for entry in batch:
                    await self._run_entries([entry], isolate=False)
                return None
            self._fail(batch, exc)
            return None
        except Exception as exc:
            log.exception("batch for %s failed", self.name)
            self._fail(batch, exc)
            return None
        outputs = report.outputs
        offset = 0
        for entry in batch:
            part = outputs[offset:offset + len(entry.items)]
            offset += len(entry.items)
            if not entry.future.done():
                entry.future.set_result(part)
        return report

    async def _run_halving(self, key: Any, items: list[Any]) -> BatchReport:
        """Step 6: out of device memory, a smaller batch may fit; only a single item that does not is refused."""
        try:
            return await self.run(key, items)
        except SIEError as exc:
            if exc.code != ErrorCode.RESOURCE_EXHAUSTED or len(items) < 2:
                raise
        log.warning("%s ran out of memory on a batch of %d; running it in halves", self.name, len(items))
        half = len(items) // 2
        first = await self._run_halving(key, items[:half])
        second = await self._run_halving(key, items[half:])
        return BatchReport(_concat(first.outputs, second.outputs))  # no timing: a split batch teaches the pacer nothing

    @staticmethod
    def _fail(batch: list[Entry], exc: Exception) -> None:
        for entry in batch:
            if not entry.future.done():
                entry.future.set_exception(exc)

    def _observe(self, batch: list[Entry]) -> None:
        key = batch[0].key
        kind = str(getattr(key, "op", key[0] if isinstance(key, tuple) else "batch"))
        now = time.perf_counter()
        queue_seconds = metrics.REQUEST_DURATION.labels(self.name, kind, "queue")
        for entry in batch:
            queue_seconds.observe(now - entry.enqueued)
        metrics.BATCH_SIZE.labels(self.name).observe(sum(len(e.items) for e in batch))

    def fail_queued(self, error: Exception) -> None:
        """Fail every queued entry (its model is being evicted); batches already sent finish normally."""
        while self.queue:
            entry = self.queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(error)
        self._set_queued(0)

    async def close(self) -> None:
        if self._loop_task is not None:
            await self._loop_task.stop()
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for entry in self.queue:
            if not entry.future.done():
                entry.future.set_exception(SIEError(ErrorCode.SHUTTING_DOWN, "the server is shutting down"))
        self.queue.clear()
        self.queued_items = 0


def itertools_islice(queue: deque[Entry], n: int) -> list[Entry]:
    return [queue[i] for i in range(min(n, len(queue)))]


def _concat(first: Any, second: Any) -> Any:
    """Two halves' outputs as one: a list, or array outputs (`sie_router.pipeline.jobs`) joined in their given order."""
    if isinstance(first, list):
        return first + second
    return type(first).join([first, second], list(range(len(first) + len(second))))

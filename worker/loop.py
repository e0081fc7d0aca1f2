"""The worker process: load the adapter, say `Ready`, then serve batches until told to stop.

Two threads: the prepare thread receives batches and tokenises them (CPU), the main thread runs the forward pass
and sends results, so tokenising batch n+1 overlaps the forward of batch n. Each ZeroMQ socket belongs to one thread.
The prepare thread also answers the router's `Ping` at once, busy or idle: a frozen process is found in seconds.
SIGTERM only sets a flag; the batch in hand finishes first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from contextvars import ContextVar
from typing import Any

import msgspec
import setproctitle
import zmq

from sie_sdk.codes import ErrorCode
from sie_worker import cuda, protocol, telemetry, tokens
from sie_worker.adapters import build_adapter, graph_cache
from sie_worker.adapters.base import Adapter, BadInput, Prepared, StartsEarly, UnsupportedTask, torch_precision
from sie_worker.failures import batch_failure_code, load_error_class
from sie_worker.parent import die_with_parent
from sie_worker.protocol import (
    Alive,
    BatchDone,
    BatchFailed,
    BatchTiming,
    DecodeBatch,
    ExportStarting,
    LoadFailed,
    Ping,
    Ready,
    Shutdown,
    TokenizeBatch,
    WorkerSpec,
)

log = logging.getLogger("sie.worker")
_POLL_MS = 100
# Test-only faults, off unless the environment names one: `bad_frame` sends an undecodable frame before the first
# reply, `garbage` before every reply, `unknown_code` answers the first batch with a code no router knows.
FAULT_ENV = "SIE_WORKER_FAULT"
FAULTS = frozenset({"bad_frame", "garbage", "unknown_code"})
UNDECODABLE = b"\xc1 is never valid msgpack"
# The trace id of the traced batch this thread works on, for the log lines it writes meanwhile.
_trace_id: ContextVar[str | None] = ContextVar("sie_worker_trace_id", default=None)


class _Failed:
    """A batch that failed before its forward pass; the main thread reports it in order."""

    def __init__(self, batch_id: int, code: ErrorCode, message: str) -> None:
        self.report: BatchFailed | BatchDone = BatchFailed(batch_id=batch_id, code=code, message=message)


class _Answered(_Failed):
    """A tokenize or decode request answered on the prepare thread; the main thread sends it in order."""

    def __init__(self, batch: TokenizeBatch | DecodeBatch, adapter: Adapter) -> None:
        self.report = BatchDone(batch_id=batch.batch_id, result=tokens.answer(adapter, batch))


_STOP = object()


def _injected_fault(model: str) -> str:
    """Test-only: the fault `SIE_WORKER_FAULT=<fault>:<model>[,...]` names for this model, or "" (in production)."""
    for entry in os.environ.get(FAULT_ENV, "").split(","):
        fault, _, target = entry.partition(":")
        if fault in FAULTS and target == model:
            return fault
    return ""


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.stopping = threading.Event()
        self.device_fault: BaseException | None = None  # a CUDA error that broke the context: serve no more
        # Unbounded, so that the prepare thread never blocks on it and always answers pings: the router bounds what
        # it sends (two batches per model at a time, and tokenize calls between them).
        self.ready_batches: queue.Queue[Any] = queue.Queue()
        self.context = zmq.Context()
        self.recv_from_router = self.context.socket(zmq.DEALER)
        self.recv_from_router.setsockopt(zmq.IDENTITY, spec.worker_id.encode())
        self.recv_from_router.connect(spec.to_worker_endpoint)
        self.send_to_router = self.context.socket(zmq.PUSH)
        self.send_to_router.setsockopt(zmq.LINGER, 2000)
        self.send_to_router.connect(spec.from_worker_endpoint)
        self.identity = spec.worker_id.encode()
        self.injected_fault = _injected_fault(spec.model)
        self.replies = 0
        # Each worker exports its own spans: its process, model and device are the resource, and no span has to cross
        # back to the router. OpenTelemetry is imported only here, only when tracing is on.
        self.spans = (telemetry.PhaseSpans(telemetry.start_tracing(
            spec.otlp_endpoint, spec.otlp_service_name, {"sie.process": "worker", "sie.model": spec.model,
                                                         "sie.worker_id": spec.worker_id, "sie.device": spec.device}),
            "sie_worker") if spec.otlp_endpoint else None)

    def send(self, message: protocol.Message) -> None:
        """Send a reply, after our id: the router's PULL socket cannot tell who sent a frame otherwise."""
        self.replies += 1
        if self.injected_fault == "garbage" or (self.injected_fault == "bad_frame" and self.replies == 1):
            self.send_to_router.send_multipart([self.identity, UNDECODABLE])
        answer = isinstance(message, (BatchDone, BatchFailed))
        if self.injected_fault == "unknown_code" and self.replies == 1 and answer:
            message = BatchFailed(batch_id=message.batch_id, code="NO_SUCH_CODE", message="injected")  # type: ignore[arg-type]
        self.send_to_router.send_multipart([self.identity, protocol.encode(message)], copy=False)

    def send_handshake(self, message: Ready | LoadFailed | Alive | ExportStarting) -> None:
        # The handshake goes over the DEALER: once the router reads it, it can route batches to this identity. The
        # DEALER is the main thread's until `Ready`, then the prepare thread's, which answers pings on it.
        self.recv_from_router.send(protocol.encode(message))

    def load(self) -> Adapter | None:
        started = time.monotonic()
        log.info("loading %s (%s adapter) from %s on %s", self.spec.model, self.spec.adapter,
                 self.spec.weights_dir, self.spec.device)
        try:
            free_before = cuda.prepare_device(self.spec) if self.spec.adapter != "fake" else None
            graph_cache.on_export_start = lambda: self.send_handshake(ExportStarting())
            adapter = build_adapter(self.spec)
            if "torch" in sys.modules:  # a torch adapter: its threads before its first op; a lean one never maps it
                configure_torch_threads(self.spec.threads)
            info = adapter.load()
            context_bytes = cuda.context_bytes(self.spec, free_before)  # after the warm-up loaded cuBLAS and kernels
        except Exception as exc:  # any load error is reported, then the process exits
            log.exception("loading %s failed", self.spec.model)
            self.send_handshake(LoadFailed(worker_id=self.spec.worker_id, code=ErrorCode.MODEL_LOAD_FAILED,
                                           error_class=load_error_class(exc), message=f"{type(exc).__name__}: {exc}"))
            return None
        seconds = time.monotonic() - started
        log.info("loaded %s in %.2fs on %s (dims %s)", self.spec.model, seconds, info.engine, info.dims)
        self.send_handshake(Ready(worker_id=self.spec.worker_id, model=self.spec.model, device=self.spec.device,
                        memory_bytes=adapter.memory_bytes(), dims=info.dims, capabilities=info.capabilities,
                        engine=info.engine, precision=info.precision or torch_precision(self.spec),
                        max_sequence_length=info.max_sequence_length, load_seconds=seconds, pid=os.getpid(),
                        context_bytes=context_bytes))
        return adapter

    def prepare_loop(self, adapter: Adapter) -> None:
        """Receive and tokenise batches; runs on the prepare thread."""
        poller = zmq.Poller()
        poller.register(self.recv_from_router, zmq.POLLIN)
        while not self.stopping.is_set():
            if not poller.poll(_POLL_MS):
                continue
            frame = self.recv_from_router.recv(copy=False)
            try:
                message = protocol.decode_for_worker(frame.buffer)
            except msgspec.DecodeError:
                log.error("dropping an undecodable frame from the router")
                continue
            if isinstance(message, Shutdown):
                break
            if isinstance(message, Ping):
                self.send_handshake(Alive())
                continue
            trace = getattr(message, "trace", None)
            _trace_id.set(telemetry.trace_id_of(trace))
            started = time.time_ns()
            try:
                item: Any = (_Answered(message, adapter) if isinstance(message, TokenizeBatch | DecodeBatch)
                             else adapter.prepare(message))
                if isinstance(item, Prepared) and isinstance(adapter, StartsEarly):
                    adapter.start(item)  # its forward calls queue behind the running batch's (Lanes.start)
            except Exception as exc:
                item = _Failed(message.batch_id, batch_failure_code(exc), f"{type(exc).__name__}: {exc}")
            self.trace(trace, "sie.worker.tokenize", message.batch_id, started)
            self.ready_batches.put(item)
        self.ready_batches.put(_STOP)

    def serve(self, adapter: Adapter) -> None:
        """Run forward passes and send results; runs on the main thread until the prepare thread stops."""
        while True:
            try:
                item = self.ready_batches.get(timeout=_POLL_MS / 1000)
            except queue.Empty:
                continue
            if item is _STOP:
                return
            if isinstance(item, _Failed):
                self.send(item.report)
            else:
                self.serve_one(adapter, item)
            if self.device_fault is not None:
                return

    def serve_one(self, adapter: Adapter, prepared: Prepared) -> None:
        """Run one prepared batch and send its reply; a traced batch's forward pass and post-processing (its result
        packed into the reply and sent) become spans under the router's batch span."""
        trace = prepared.batch.trace
        _trace_id.set(telemetry.trace_id_of(trace))
        started = time.time_ns()
        reply = self.run_one(adapter, prepared)
        answered = time.time_ns()
        self.send(reply)
        self.trace(trace, "sie.worker.forward", prepared.batch.batch_id, started, answered)
        self.trace(trace, "sie.worker.postprocess", prepared.batch.batch_id, answered)

    def trace(self, traceparent: str | None, name: str, batch_id: int, start_ns: int, end_ns: int = 0) -> None:
        """Record a phase of a traced batch as a span (nothing when tracing is off or the batch is not traced)."""
        if self.spans is not None and traceparent:
            self.spans.record(name, traceparent, start_ns, end_ns or time.time_ns(),
                              {"sie.model": self.spec.model, "sie.batch_id": batch_id})

    def run_one(self, adapter: Adapter, prepared: Prepared) -> protocol.Message:
        batch_id = prepared.batch.batch_id
        started = time.perf_counter()
        failed: BatchFailed | None = None
        out_of_memory = False
        try:
            result = adapter.forward(prepared)
        except Exception as exc:  # errors inside a batch are data; the worker keeps serving, unless CUDA broke
            if not isinstance(exc, (BadInput, UnsupportedTask)):
                log.exception("batch %d failed", batch_id)
            if cuda.is_device_fault(exc):
                self.device_fault = exc
            out_of_memory = cuda.is_out_of_memory(exc)
            failed = BatchFailed(batch_id=batch_id, code=batch_failure_code(exc),
                                 message=f"{type(exc).__name__}: {exc}")
        if failed is not None:
            if out_of_memory:
                # Outside the except block: its traceback held the failed forward's frames and their tensors, which
                # empty_cache() could not hand back. The router retries the halves next.
                cuda.release_cached_memory()
            return failed
        timing = BatchTiming(tokenize_ms=prepared.tokenize_ms,
                             inference_ms=(time.perf_counter() - started) * 1000.0)
        allocated, reserved = cuda.memory_figures()
        return BatchDone(batch_id=batch_id, result=result, timing=timing, memory_allocated=allocated,
                         memory_reserved=reserved)

    def stop_preparing(self, preparer: threading.Thread, deadline_s: float = 2.0) -> bool:
        """Stop the prepare thread before its batches are served (they fail with this worker's exit); whether it
        stopped. Batches it has queued are dropped."""
        self.stopping.set()
        deadline = time.monotonic() + deadline_s
        while preparer.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                self.ready_batches.get(timeout=_POLL_MS / 1000)
        return not preparer.is_alive()

    def close(self) -> None:
        if self.spans is not None:
            self.spans.close()
        self.recv_from_router.close(linger=2000)
        self.send_to_router.close()
        self.context.term()


def run(spec: WorkerSpec) -> int:
    """Serve one model until `Shutdown` or SIGTERM; returns the exit status."""
    worker = Worker(spec)
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the router decides
    adapter = worker.load()
    if adapter is None:
        worker.close()
        return 1
    preparer = threading.Thread(target=worker.prepare_loop, args=(adapter,), name="sie-prepare", daemon=True)
    preparer.start()
    worker.serve(adapter)
    if worker.device_fault is not None:
        # The context is broken: every later batch would fail. The batch's BatchFailed is sent; exit so that the
        # router restarts the worker under its crash budget. os._exit: a broken context can hang CUDA's teardown.
        log.critical("CUDA error, exiting for a restart: %s", worker.device_fault)
        if worker.stop_preparing(preparer):
            worker.close()  # every socket closed by its own thread's end: the BatchFailed is flushed (linger)
        os._exit(cuda.EXIT_DEVICE_FAULT)
    adapter.close()
    worker.close()
    return 0


def configure_torch_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def entry(spec_bytes: bytes) -> None:
    """The process entry (`python -m sie_worker`, spec bytes from stdin): environment first, then heavy imports."""
    spec = msgspec.msgpack.decode(spec_bytes, type=WorkerSpec)
    os.environ.update(spec.env)
    die_with_parent(signal.SIGTERM)  # a SIGKILLed router cannot stop us: the kernel does
    telemetry.configure_logging("INFO", spec.log_format == "json", lambda: {"model": spec.model,
                                                                            "trace_id": _trace_id.get()},
                                text_format=f"%(asctime)s %(levelname)s sie-worker[{spec.model}] %(message)s")
    setproctitle.setproctitle(f"sie-worker:{spec.model}@{spec.device}")
    sys.exit(run(spec))

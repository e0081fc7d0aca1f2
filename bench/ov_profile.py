"""Where a forward's time goes: OpenVINO's per-operator profile of the lean dense worker's graph (all-MiniLM-L6-v2)
on one stream, by operator type and kernel, against torch's bf16 GEMM rate on the same threads.

    .venv/bin/python bench/ov_profile.py --rows 13 --length 40 --threads 1
    .venv/bin/python bench/ov_profile.py --graph /tmp/variant --precision f32   # another export, another precision
    .venv/bin/python bench/ov_profile.py --corpus 2 --calls 3   # the real calls of two corpus batches of 256

The rows get lengths between length - 7 and length (padded to `length`, as a bucket is), so the attention masks
are those of a real call. The graph is the one the worker serves, from the engine cache (exported first if missing).
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np

# MiniLM-L6's linear layers per token and layer: Q, K, V and the output projection (4 x 384 x 384), the FFN
# (2 x 384 x 1536), two FLOPs a multiply-add.
LINEAR_FLOPS_PER_TOKEN = 6 * 2 * (4 * 384 * 384 + 2 * 384 * 1536)


def served_graph():
    """The graph the worker serves (graph_cache.Graph)."""
    import levers

    adapter = levers.adapter_for({}, 1)
    try:
        return adapter.session.graph
    finally:
        adapter.close()


def feed(rows: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(max(1, length - 7), length + 1, rows)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(1000, 20000, (rows, length)).astype(np.int64) * mask, "attention_mask": mask,
            "token_type_ids": np.zeros((rows, length), np.int64)}


def corpus_calls(batches: int) -> list[dict[str, np.ndarray]]:
    """The padded calls the served engine makes for the first `batches` corpus batches of 256 sentences."""
    from sie_worker.protocol import EncodeBatch, InputItem

    import levers
    from corpus import make_corpus

    adapter, corpus = levers.adapter_for({}, 2), make_corpus()
    try:
        return [padded for b in range(batches) for _, padded in adapter.prepare(EncodeBatch(
            batch_id=b, items=[InputItem(text=t) for t in corpus[b * 256:(b + 1) * 256]],
            output_types=["dense"])).inputs]
    finally:
        adapter.close()


def gemm_rate(threads: int, m: int) -> float:
    """torch's bf16 GFLOP/s on MiniLM's FFN product (m x 384 x 1536), best of 5 windows."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(m, 384, dtype=torch.bfloat16), torch.randn(384, 1536, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(20):
            a @ b
        best = max(best, 20 * 2 * m * 384 * 1536 / (time.perf_counter() - started) / 1e9)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=13)
    p.add_argument("--length", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--precision", default="bf16", help="OpenVINO's inference precision hint")
    p.add_argument("--graph", help="a graph folder (export_graph's output) instead of the one the worker serves")
    p.add_argument("--corpus", type=int, default=0, metavar="BATCHES",
                   help="profile the real calls of this many corpus batches of 256 (the served engine's buckets) "
                        "instead of --rows x --length; --calls then counts rounds over them")
    a = p.parse_args()
    import openvino as ov
    from sie_worker.adapters import graph_cache
    from sie_worker.adapters.graph_runtime import graph_feed

    if a.graph:
        graph = graph_cache.read_graph(Path(a.graph))
        assert graph is not None, f"no graph in {a.graph}"
    else:
        graph = served_graph()
    core = ov.Core()
    compiled = core.compile_model(core.read_model(graph.openvino_path), "CPU", {
        "INFERENCE_NUM_THREADS": a.threads, "NUM_STREAMS": 1, "PERF_COUNT": True,
        "INFERENCE_PRECISION_HINT": a.precision})
    names = {port.get_any_name() for port in compiled.inputs}
    calls = [{k: v for k, v in graph_feed(graph)(padded).items() if k in names}
             for padded in (corpus_calls(a.corpus) if a.corpus else [feed(a.rows, a.length)])]
    request = compiled.create_infer_request()
    for inputs in calls * 2:
        request.infer(inputs)
    spent: collections.Counter[tuple[str, str]] = collections.Counter()
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    started = time.perf_counter()
    for _ in range(a.calls):
        for inputs in calls:
            request.infer(inputs)
            for op in request.get_profiling_info():
                spent[op.node_type, op.exec_type] += op.real_time.total_seconds()
                counts[op.node_type, op.exec_type] += 1
    wall = (time.perf_counter() - started) / a.calls
    total = sum(spent.values()) / a.calls
    # the tokens the linear layers compute: a packed call's flat tokens, a padded call's every position
    tokens = sum(int(inputs["input_ids"].size) for inputs in calls)
    rows = sum(int(inputs["attention_mask"].shape[0]) for inputs in calls)
    what = f"{len(calls)} calls of {a.corpus} corpus batches" if a.corpus else f"{a.rows} x {a.length} tokens"
    print(f"{what}, {a.threads} thread(s): {wall * 1e3:.1f} ms a round, {rows / wall:.0f} sentences/s, profiled "
          f"{total * 1e3:.1f} ms (the rest of the wall time is the runtime's own, outside the operators)")
    print("  ms a round, share of the profiled time, operators of the kind in one call:")
    for (node, kernel), seconds in spent.most_common(12):
        each, times = seconds / a.calls, counts[node, kernel] // a.calls // len(calls)
        print(f"  {each * 1e3:7.2f} ms {each / total:6.1%}  {times:3d} a call: {node} ({kernel})")
    fc = sum(s for (node, _), s in spent.items() if node == "FullyConnected") / a.calls
    per_call = max(1, tokens // len(calls))  # torch's product at a call's mean size
    print(f"FullyConnected: {LINEAR_FLOPS_PER_TOKEN * tokens / fc / 1e9:.0f} GFLOP/s; torch bf16 GEMM "
          f"{per_call} x 384 x 1536 on {a.threads} thread(s): {gemm_rate(a.threads, per_call):.0f} GFLOP/s")


if __name__ == "__main__":
    main()

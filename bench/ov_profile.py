"""Where a forward's time goes: OpenVINO's per-operator profile of the lean dense worker's graph (all-MiniLM-L6-v2)
on one stream, by operator type and kernel, against torch's bf16 GEMM rate on the same threads.

    .venv/bin/python bench/ov_profile.py --rows 13 --length 40 --threads 1
    .venv/bin/python bench/ov_profile.py --graph /tmp/variant --precision f32   # another export, another precision

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
    request, inputs = compiled.create_infer_request(), graph_feed(graph)(feed(a.rows, a.length))
    for _ in range(3):
        request.infer(inputs)
    spent: collections.Counter[tuple[str, str]] = collections.Counter()
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    started = time.perf_counter()
    for _ in range(a.calls):
        request.infer(inputs)
        for op in request.get_profiling_info():
            spent[op.node_type, op.exec_type] += op.real_time.total_seconds()
            counts[op.node_type, op.exec_type] += 1
    wall = (time.perf_counter() - started) / a.calls
    total = sum(spent.values()) / a.calls
    tokens = a.rows * a.length
    print(f"{a.rows} x {a.length} tokens, {a.threads} thread(s): {wall * 1e3:.1f} ms a call, "
          f"{a.rows / wall:.0f} sentences/s, profiled {total * 1e3:.1f} ms")
    for (node, kernel), seconds in spent.most_common(12):
        each, times = seconds / a.calls, counts[node, kernel] // a.calls
        print(f"  {each * 1e3:7.2f} ms {each / total:6.1%}  {times:3d}x {node} ({kernel})")
    fc = sum(s for (node, _), s in spent.items() if node == "FullyConnected") / a.calls
    print(f"FullyConnected: {LINEAR_FLOPS_PER_TOKEN * tokens / fc / 1e9:.0f} GFLOP/s; torch bf16 GEMM "
          f"{tokens} x 384 x 1536 on {a.threads} thread(s): {gemm_rate(a.threads, tokens):.0f} GFLOP/s")


if __name__ == "__main__":
    main()

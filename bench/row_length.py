"""How far a text's hidden state moves with the padded length of the row it sits in, in the bf16 engine's graph
(all-MiniLM-L6-v2, OpenVINO, one thread). A batch pads each attention row to its bucket's length, so the same text
meets rows of 40, 48 or 64 tokens depending on its neighbours.

    .venv/bin/python bench/row_length.py                     # the graph the worker serves
    .venv/bin/python bench/row_length.py --graph /tmp/variant  # another export (export_graph's folder)

Prints, over corpus texts of 20-40 tokens, each alone in a row padded to 40, 48 and 64: the largest difference of one
hidden value from the row of 40, and the lowest cosine of the mean-pooled vectors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sie_worker.adapters import graph_cache
from sie_worker.adapters.packed_feed import PACKED_INPUTS, pack

from corpus import make_corpus
from ov_profile import served_graph

ROW_LENGTHS = (40, 48, 64)


def row_feed(ids: list[int], length: int) -> dict[str, np.ndarray]:
    feed = {name: np.zeros((1, length), np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
    feed["input_ids"][0, :len(ids)], feed["attention_mask"][0, :len(ids)] = ids, 1
    return feed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graph", help="a graph folder (export_graph's output) instead of the one the worker serves")
    p.add_argument("--texts", type=int, default=60)
    a = p.parse_args()
    import openvino as ov
    from tokenizers import Tokenizer

    graph = graph_cache.read_graph(Path(a.graph)) if a.graph else served_graph()
    assert graph is not None and graph.packed, "a packed graph"
    tokenizer = Tokenizer.from_file(str(graph.tokenizer_path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    texts = [ids for ids in (tokenizer.encode(t).ids for t in make_corpus()) if 20 <= len(ids) <= 40][:a.texts]
    compiled = ov.Core().compile_model(graph.openvino_path, "CPU", {
        "INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "bf16"})
    request = compiled.create_infer_request()
    largest, lowest = 0.0, 1.0
    for ids in texts:
        outputs = []
        for length in ROW_LENGTHS:
            packed = pack(row_feed(ids, length))
            outputs.append(np.array(request.infer([packed[name] for name in PACKED_INPUTS])[0])[0, :len(ids)])
        for other in outputs[1:]:
            largest = max(largest, float(np.abs(other - outputs[0]).max()))
            u, v = other.mean(0), outputs[0].mean(0)
            lowest = min(lowest, float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
    print(f"{graph.openvino_path}: {len(texts)} texts in rows of {', '.join(map(str, ROW_LENGTHS))} tokens, bf16; "
          f"largest hidden difference {largest:.4g}, lowest mean-pooled cosine {lowest:.7f}")


if __name__ == "__main__":
    main()

"""BGE-M3 hybrid embeddings on CPU without torch (worker process): the encoder's graph (`graph_cache.HYBRID`, its last
hidden state) under OpenVINO or ONNX Runtime, then FlagEmbedding's three outputs in numpy as `hybrid` computes them
with torch: dense, the normalised CLS row; sparse, relu of the sparse head per token, the largest weight per token id,
special ids left out; multivector, every real token after CLS through the ColBERT head, normalised. The heads' weights
come from the graph's folder, where the export wrote them as numpy (`export_heads.write_head_files`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sie_worker.adapters import graph_cache
from sie_worker.adapters.base import Prepared
from sie_worker.adapters.batching import read_json
from sie_worker.adapters.hybrid_heads import HEAD_FILES, MAX_LENGTH, OUTPUTS, SKIP_ROLES, Outputs, check_batch
from sie_worker.adapters.lean_engine import GraphSession, LeanAdapter, build_lean
from sie_worker.adapters.lean_multivector import NumpyProjection, l2_normalized
from sie_worker.adapters.packing import SparseRow
from sie_worker.options import HybridOptions
from sie_worker.protocol import EncodeBatch, EncodeResult, WorkerSpec


def read_heads(path: Path) -> dict[str, NumpyProjection]:
    """The linear heads (`sparse`, `colbert`) the export wrote as `<head>.weight` and `<head>.bias` arrays."""
    with np.load(path) as data:
        return {name: NumpyProjection(data[f"{name}.weight"], data.get(f"{name}.bias"))
                for name in HEAD_FILES}


def lexical_rows(token_weights: np.ndarray, input_ids: np.ndarray, mask: np.ndarray,
                 skip_ids: np.ndarray) -> list[SparseRow]:
    """Per item of [B, T] token weights (after relu), the largest weight of each token id over its real tokens,
    `skip_ids` left out: (ascending int32 ids, float32 weights) of those above 0, as `hybrid.sparse_weights`."""
    rows: list[SparseRow] = []
    for weights, ids, real in zip(token_weights, input_ids, mask.astype(bool), strict=True):
        keep = real & (weights > 0) & ~np.isin(ids, skip_ids)
        unique, inverse = np.unique(ids[keep], return_inverse=True)
        largest = np.zeros(len(unique), np.float32)
        np.maximum.at(largest, inverse, weights[keep])
        rows.append((unique.astype(np.int32), largest))
    return rows


def colbert_rows(hidden: np.ndarray, mask: np.ndarray, head: NumpyProjection, normalize: bool) -> list[np.ndarray]:
    """Per item, its real tokens after the first (CLS) through the ColBERT head [kept, dim], as
    `hybrid.colbert_vectors`."""
    real = mask[:, 1:].astype(bool)
    vectors = head(hidden[:, 1:][real], normalize)
    return np.split(vectors, np.cumsum(real.sum(axis=1))[:-1])


def build(spec: WorkerSpec) -> LeanHybridAdapter | None:
    config = read_json(Path(spec.weights_dir) / "config.json")
    vocab_size = config.get("vocab_size") if isinstance(config, dict) else None
    if not isinstance(vocab_size, int):
        return None  # the torch adapter says what is wrong with the checkpoint
    return build_lean(spec, Path(spec.weights_dir), graph_cache.HYBRID,
                      lambda graph, runtime: LeanHybridAdapter(spec, graph, runtime, vocab_size))


class LeanHybridAdapter(LeanAdapter):
    capabilities = OUTPUTS

    def __init__(self, spec: WorkerSpec, graph: graph_cache.Graph, runtime: str, vocab_size: int) -> None:
        max_length = spec.max_sequence_length or min(graph.model_max_length, MAX_LENGTH)
        self.session = GraphSession(spec, graph, runtime, max_length)
        self.normalize = spec.options_as(HybridOptions).normalize
        self.vocab_size = vocab_size

    def open(self) -> None:
        # Read first: a graph in a temporary folder (an unwritable cache) is gone once a runtime has opened it.
        self.heads = read_heads(self.session.graph.folder / graph_cache.HYBRID_HEADS)
        self.colbert_dim = int(self.heads["colbert"].weight.shape[0])
        special = self.session.graph.special_ids or {}
        self.skip_ids = np.array(sorted({special[role] for role in SKIP_ROLES if role in special}), dtype=np.int64)
        super().open()

    def dims(self) -> dict[str, int]:
        return {"dense": self.session.graph.hidden_size, "sparse": self.vocab_size, "multivector": self.colbert_dim}

    def prepare(self, batch: Any) -> Prepared:
        return self.session.prepare_texts(check_batch(batch))

    def forward(self, prepared: Prepared) -> EncodeResult:
        assert self.session.lanes is not None, "load() first"
        batch = prepared.batch
        assert isinstance(batch, EncodeBatch)
        out = Outputs.sized(len(prepared.token_counts))
        for (indices, feed), hidden in self.bucket_outputs(prepared):
            self.heads_of_bucket(indices, feed, hidden, batch.output_types, out)
        return out.result(prepared.token_counts, batch.output_types, self.colbert_dim)

    def heads_of_bucket(self, indices: list[int], feed: dict[str, np.ndarray], hidden: np.ndarray,
                        output_types: list[str], out: Outputs) -> None:
        mask = feed["attention_mask"]
        if "dense" in output_types:
            dense = hidden[:, 0].astype(np.float32)
            out.put("dense", indices, l2_normalized(dense) if self.normalize else dense)
        if "sparse" in output_types:
            token_weights = np.maximum(self.heads["sparse"](hidden, normalize=False)[..., 0], 0.0)
            out.put("sparse", indices, lexical_rows(token_weights, feed["input_ids"], mask, self.skip_ids))
        if "multivector" in output_types:
            out.put("multivector", indices, colbert_rows(hidden, mask, self.heads["colbert"], self.normalize))

"""SPLADE sparse embeddings on CPU without torch (worker process): texts through the Rust tokenizer, the masked LM and
SPLADE's pooling in one graph (`graph_cache.splade_head`: masked logits, relu, log1p, max or sum over tokens, so the
[items, tokens, vocabulary] logits never leave the runtime), and the positive weights packed as CSR rows in numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sie_worker.adapters import graph_cache
from sie_worker.adapters.base import Prepared, UnsupportedTask
from sie_worker.adapters.lean_engine import GraphSession, LeanAdapter, build_lean
from sie_worker.adapters.packing import SparseRow, join_sparse, positive_rows
from sie_worker.options import SparseOptions
from sie_worker.protocol import EncodeBatch, EncodeResult, WorkerSpec
from sie_worker.st_layout import read_layout


def splade_settings(spec: WorkerSpec) -> tuple[str, str]:
    """(pooling strategy, activation): the profile's, else the checkpoint's SpladePooling, else max of relu; a
    ValueError for one neither engine computes."""
    splade = read_layout(Path(spec.weights_dir)).module("SpladePooling")
    declared = {} if splade is None else splade.config  # a bare MLM folder has none
    options = spec.options_as(SparseOptions)
    strategy = str(options.pooling_strategy or declared.get("pooling_strategy") or "max")
    activation = str(options.activation_function or declared.get("activation_function") or "relu")
    if strategy not in ("max", "sum") or activation not in ("relu", "log1p_relu"):
        raise ValueError(f"unsupported SPLADE pooling {strategy!r} / activation {activation!r}")
    return strategy, activation


def build(spec: WorkerSpec) -> LeanSparseAdapter | None:
    head = graph_cache.splade_head(*splade_settings(spec))
    max_length = spec.max_sequence_length or read_layout(Path(spec.weights_dir)).max_seq_length
    return build_lean(spec, Path(spec.weights_dir), head,
                      lambda graph, runtime: LeanSparseAdapter(spec, graph, runtime, max_length))


class LeanSparseAdapter(LeanAdapter):
    capabilities = ("sparse",)

    def __init__(self, spec: WorkerSpec, graph: graph_cache.Graph, runtime: str, max_length: int | None) -> None:
        self.session = GraphSession(spec, graph, runtime, max_length)

    def dims(self) -> dict[str, int]:
        return {"sparse": self.session.graph.output_width}

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        if set(batch.output_types) - {"sparse"}:
            raise UnsupportedTask(f"this model only has sparse outputs, not {sorted(batch.output_types)}")
        return self.session.prepare_texts(batch)

    def forward(self, prepared: Prepared) -> EncodeResult:
        assert self.session.lanes is not None, "load() first"
        parts: list[SparseRow] = [(np.empty(0, np.int32), np.empty(0, np.float32))] * len(prepared.token_counts)
        for (indices, _), weights in self.bucket_outputs(prepared):
            for i, row in zip(indices, positive_rows(weights), strict=True):
                parts[i] = row
        sparse_indices, sparse_values, sparse_offsets = join_sparse(parts)
        return EncodeResult(token_counts=prepared.token_counts, sparse_indices=sparse_indices,
                            sparse_values=sparse_values, sparse_offsets=sparse_offsets)

"""What the torch and lean BGE-M3 hybrid adapters share (worker process, free of torch): the three outputs and the
refusals, the head files beside the encoder, the ids that carry no lexical weight, and the per-item outputs gathered
across length buckets into one result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sie_worker.adapters.base import UnsupportedTask
from sie_worker.adapters.packing import SparseRow, join_rows, join_sparse
from sie_worker.protocol import EncodeBatch, EncodeResult, Tensor

OUTPUTS = ("dense", "sparse", "multivector")
# The heads beside the encoder, torch state dicts as BAAI/bge-m3 ships them: Linear(hidden, 1), Linear(hidden, dim).
HEAD_FILES = {"sparse": "sparse_linear.pt", "colbert": "colbert_linear.pt"}
# The tokens that never carry lexical weight, FlagEmbedding's list (XLM-R's eos is also its sep).
SKIP_ROLES = ("cls", "eos", "pad", "unk")
# The longest input when the spec sets none: the tokenizer's, at most BGE-M3's 8192.
MAX_LENGTH = 8192


def check_batch(batch: Any) -> EncodeBatch:
    """The batch, if a hybrid model can answer it: an encode asking only for its outputs; UnsupportedTask otherwise."""
    if not isinstance(batch, EncodeBatch):
        raise UnsupportedTask("this model only encodes")
    if set(batch.output_types) - set(OUTPUTS):
        raise UnsupportedTask(f"this model has no {sorted(set(batch.output_types) - set(OUTPUTS))} outputs")
    return batch


@dataclass
class Outputs:
    """Per-item outputs gathered across the length buckets of one batch, in item order."""

    dense: list[np.ndarray]
    sparse: list[SparseRow]
    multivector: list[np.ndarray]

    @classmethod
    def sized(cls, count: int) -> Outputs:
        # Each requested slot is overwritten by exactly one bucket; the placeholders only give the lists their length.
        empty = np.empty(0, np.float32)
        return cls([empty] * count, [(np.empty(0, np.int32), empty)] * count, [empty] * count)

    def put(self, output: str, indices: list[int], rows: Sequence[Any]) -> None:
        """One bucket's rows of `output` (dense, sparse or multivector) into their items' places."""
        column = getattr(self, output)
        for i, row in zip(indices, rows, strict=True):
            column[i] = row

    def result(self, token_counts: list[int], output_types: list[str], colbert_dim: int) -> EncodeResult:
        result = EncodeResult(token_counts=token_counts)
        if "dense" in output_types:
            result.dense = Tensor.from_numpy(np.stack(self.dense))
        if "sparse" in output_types:
            result.sparse_indices, result.sparse_values, result.sparse_offsets = join_sparse(self.sparse)
        if "multivector" in output_types:
            result.multivector, result.multivector_offsets = join_rows(self.multivector, colbert_dim)
        return result

"""The packed layout of an encoder graph's inputs (worker process, free of torch): the real tokens of a padded call
laid end to end, so that the linear layers, 82% of a MiniLM forward on the CPU, compute no padding.

A packed graph (`graph_cache.Graph.packed`, exported by `export_packed`) takes a call's tokens flat, `[N]`, with the
indices that move them into padded rows `[B, L]` for attention and back; its output is the last hidden state `[B, L, H]`
as a padded graph's, with zeros at padding. Every caller builds padded feeds as for any graph, and the runtime packs
them (`pack`) just before the call: buckets, warm-up, probe checks and heads are the same for both layouts.

Over a batch of 256 corpus sentences, lengths padded to multiples of 8, real tokens are 89% of the padded ones; packed,
98% (N rounded up to TOKEN_MULTIPLE). The worker computes batches of 32 and 256 3-4% faster than over the padded graph
(bench/README.md, "a correction").
"""

from __future__ import annotations

import numpy as np

# The packed graph's inputs, in the order of `export_packed.PackedEncoder.forward`.
PACKED_INPUTS = ("input_ids", "token_type_ids", "position_ids", "gather_index", "unpad_index", "attention_mask")
# An optional [B, L] entry of a padded feed: tokens that attention ignores but whose hidden states the caller reads
# (ColBERT's query expansion: [MASK] tokens no token attends to, each returned as a vector). A packed graph computes
# them too; a padded graph computes every position anyway and is never given this entry (`graph_inputs`).
COMPUTED = "computed"
# A call's flat token count is rounded up to a multiple of this with spare tokens (computed and never read): each
# distinct count is a shape the runtime specialises for and keeps in its shape cache, so counts are few.
TOKEN_MULTIPLE = 8


def graph_inputs(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A padded feed as a padded graph takes it."""
    return {name: value for name, value in feed.items() if name != COMPUTED}


def pack(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A padded feed (`input_ids`, `attention_mask` [B, L] with each row's tokens first, `token_type_ids` where the
    graph has them, `COMPUTED` where some tokens are read but not attended to) in the packed layout. The computed
    tokens (attended to or COMPUTED) of row i take consecutive flat places, rows in order; `gather_index` [B, L] names
    a computed token's flat place or N (a row of zeros the graph appends) for padding; `unpad_index` [N] names each
    flat token's place in the padded rows, row * L + position."""
    mask = feed["attention_mask"].astype(bool)
    rows, length = mask.shape
    computed = mask | feed[COMPUTED].astype(bool) if COMPUTED in feed else mask
    real = np.flatnonzero(computed)  # row * L + position of every computed token, in row order
    count = len(real)
    total = -(-max(count, 1) // TOKEN_MULTIPLE) * TOKEN_MULTIPLE
    spare = total - count

    def flat(values: np.ndarray) -> np.ndarray:
        return np.concatenate([values.reshape(-1)[real], np.zeros(spare, np.int64)]).astype(np.int64, copy=False)

    gather = np.full(rows * length, total, np.int64)
    gather[real] = np.arange(count)
    types = feed.get("token_type_ids")
    return {"input_ids": flat(feed["input_ids"]),
            "token_type_ids": flat(types) if types is not None else np.zeros(total, np.int64),
            "position_ids": flat(np.broadcast_to(np.arange(length, dtype=np.int64), (rows, length))),
            "gather_index": gather.reshape(rows, length),
            "unpad_index": np.concatenate([real, np.zeros(spare, np.int64)]).astype(np.int64, copy=False),
            "attention_mask": mask.astype(np.int64)}

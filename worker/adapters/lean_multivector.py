"""ColBERT multi-vector embeddings on CPU without torch (worker process): the encoder's graph (`graph_cache.HIDDEN`)
under OpenVINO or ONNX Runtime, then the token projection, activation and L2 normalisation in numpy, as
`multivector` computes them with torch: queries padded to their fixed length with the expansion token, documents'
punctuation rows dropped (the skiplist). The settings are `colbert_config`'s, shared with the torch adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from tokenizers import AddedToken, Tokenizer

from sie_worker.adapters import graph_cache
from sie_worker.adapters.base import Prepared, UnsupportedTask, refuse_over_length, truncates
from sie_worker.adapters.batching import MICRO_BATCH_ITEMS, Bucket, Stopwatch, read_json
from sie_worker.adapters.colbert_config import ColbertSettings, colbert_settings
from sie_worker.adapters.lean_engine import GraphSession, LeanAdapter, build_lean
from sie_worker.adapters.packed_feed import COMPUTED
from sie_worker.adapters.packing import join_rows
from sie_worker.protocol import EncodeBatch, EncodeResult, WorkerSpec
from sie_worker.st_layout import Layout, read_layout

log = logging.getLogger("sie.worker")

IDENTITY = "torch.nn.modules.linear.Identity"
ACTIVATIONS = {IDENTITY: None, "torch.nn.modules.activation.Tanh": np.tanh}


@dataclass(frozen=True)
class NumpyProjection:
    """The token projection: weight [dim, hidden] (float32), optional bias and activation."""

    weight: np.ndarray
    bias: np.ndarray | None
    activation: str = IDENTITY

    def __call__(self, hidden: np.ndarray, normalize: bool) -> np.ndarray:
        out = hidden.astype(np.float32) @ self.weight.T
        if self.bias is not None:
            out += self.bias
        activation = ACTIVATIONS[self.activation]
        out = out if activation is None else activation(out)
        return l2_normalized(out) if normalize else np.asarray(out, dtype=np.float32)


def l2_normalized(vectors: np.ndarray) -> np.ndarray:
    """float32 vectors along the last axis as torch's F.normalize makes them: x / max(||x||, 1e-12)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def _safetensors(folder: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Those of `names` in the folder's safetensors (single or sharded); None when the weights are not safetensors
    (a pytorch_model.bin needs torch to read)."""
    index = read_json(folder / "model.safetensors.index.json")
    if isinstance(index, dict):
        weight_map: dict[str, str] = index.get("weight_map", {})
        found = {}
        for name in names:
            if name in weight_map:
                with safe_open(str(folder / weight_map[name]), framework="np") as f:
                    found[name] = f.get_tensor(name)
        return found
    if (folder / "model.safetensors").exists():
        with safe_open(str(folder / "model.safetensors"), framework="np") as f:
            return {n: f.get_tensor(n) for n in names if n in f.keys()}  # noqa: SIM118 (safe_open has no __contains__)
    return None


def numpy_projection(layout: Layout) -> NumpyProjection | None:
    """`multivector.find_projection` without torch; None where only torch reads it (weights not in safetensors, an
    activation numpy does not compute here)."""
    dense = layout.module("Dense")
    folder = dense.folder if dense is not None else layout.folder
    activation = str((dense.config.get("activation_function") if dense is not None else None) or IDENTITY)
    found = _safetensors(folder, ("linear.weight", "linear.bias"))
    if found is None or "linear.weight" not in found or activation not in ACTIVATIONS:
        return None
    bias = found.get("linear.bias")
    return NumpyProjection(found["linear.weight"].astype(np.float32),
                           None if bias is None else bias.astype(np.float32), activation)


def register_prefix_tokens(backend: Tokenizer, prefixes: list[str]) -> None:
    """`multivector.register_prefix_tokens` on the Rust tokenizer: a prefix the vocabulary knows comes out as one
    special, non-normalised token when prepended as text."""
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    vocab = backend.get_vocab(with_added_tokens=True)
    register = []
    for value in prefixes:
        for candidate in ((value, value.split(None, 1)[0]) if value.strip() else ()):
            if candidate in added or candidate in vocab:
                if backend.encode(candidate, add_special_tokens=False).tokens != [candidate]:
                    register.append(AddedToken(candidate, normalized=False, special=True))
                break
    if register:
        backend.add_special_tokens(register)


def build(spec: WorkerSpec) -> LeanMultivectorAdapter | None:
    layout = read_layout(Path(spec.weights_dir))
    settings = colbert_settings(spec, layout)
    projection = numpy_projection(layout)
    if projection is None:
        log.warning("the ColBERT projection of %s is read by torch only; serving it with torch", spec.model)
        return None
    if settings.token_dim is not None and settings.token_dim != projection.weight.shape[0]:
        return None  # the torch adapter refuses it with the reason
    return build_lean(spec, layout.encoder_folder, graph_cache.HIDDEN,
                      lambda graph, runtime: LeanMultivectorAdapter(spec, graph, runtime, settings, projection))


class LeanMultivectorAdapter(LeanAdapter):
    capabilities = ("multivector",)

    def __init__(self, spec: WorkerSpec, graph: graph_cache.Graph, runtime: str, settings: ColbertSettings,
                 projection: NumpyProjection) -> None:
        self.session = GraphSession(spec, graph, runtime, settings.max_length)
        self.settings, self.projection = settings, projection
        self.dim = int(projection.weight.shape[0])

    def open(self) -> None:
        super().open()
        backend = self.session.tokenizer.backend
        register_prefix_tokens(backend, [self.settings.query_prefix, self.settings.doc_prefix])
        special = self.session.graph.special_ids or {}
        candidates = [special.get(role) for role in ("mask", "eos", "pad")]
        expansion = next((i for i in candidates if i is not None), None)
        if expansion is None:
            raise ValueError("the tokenizer has no [MASK], end-of-sequence or padding token to expand queries with")
        self.expansion_id = int(expansion)
        ids = {backend.token_to_id(word) for word in self.settings.skiplist_words}
        self.skiplist = np.array(sorted(i for i in ids if i is not None and i != special.get("unk")), dtype=np.int64)

    def dims(self) -> dict[str, int]:
        return {"multivector": self.dim}

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        if set(batch.output_types) - {"multivector"}:
            raise UnsupportedTask(f"this model only has multivector outputs, not {sorted(batch.output_types)}")
        clock = Stopwatch()
        settings = self.settings
        prefix = settings.query_prefix if batch.is_query else settings.doc_prefix
        # Queries are always cut at query_max_length: the cap is part of how ColBERT encodes them, not a limit.
        truncate = batch.is_query or truncates(batch.options)
        max_length = settings.query_max_length if batch.is_query else self.session.max_length
        encodings = self.session.tokenizer.encode_batch([prefix + (item.text or "") for item in batch.items],
                                                        max_length if truncate else None, offsets=False)
        counts = [len(encoding.ids) for encoding in encodings]
        if not truncate:
            refuse_over_length(counts, max_length)
        if batch.is_query and settings.query_expansion:
            buckets = self.expanded_queries(encodings)
        else:
            buckets = self.session.buckets(encodings)
        return Prepared(batch=batch, inputs=buckets, token_counts=counts, tokenize_ms=clock.ms())

    def expanded_queries(self, encodings: list[Any]) -> list[Bucket]:
        """Queries of exactly query_max_length tokens, padded with the expansion token, which the real tokens attend
        to only where `attend_to_expansion_tokens` (`multivector.expand_queries`)."""
        length = self.settings.query_max_length
        rows = max(1, min(MICRO_BATCH_ITEMS, self.session.max_tokens // length))
        out: list[Bucket] = []
        for start in range(0, len(encodings), rows):
            indices = list(range(start, min(start + rows, len(encodings))))
            ids = np.full((len(indices), length), self.expansion_id, dtype=np.int64)
            mask = np.ones_like(ids) if self.settings.attend_to_expansion else np.zeros_like(ids)
            types = np.zeros_like(ids)
            for row, i in enumerate(indices):
                n = len(encodings[i].ids)
                ids[row, :n], mask[row, :n], types[row, :n] = encodings[i].ids, 1, encodings[i].type_ids
            feed = self.session.feed(ids, mask, types)
            feed[COMPUTED] = np.ones_like(ids)  # every expansion token's vector is returned (`kept`)
            out.append((indices, feed))
        return out

    def kept(self, feed: dict[str, np.ndarray], is_query: bool) -> np.ndarray:
        """Which rows an item returns: every one of an expanded query; a document's real tokens off the skiplist."""
        mask = feed["attention_mask"].astype(bool)
        if is_query:
            return np.ones_like(mask) if self.settings.query_expansion else mask
        return mask & ~np.isin(feed["input_ids"], self.skiplist)

    def forward(self, prepared: Prepared) -> EncodeResult:
        assert self.session.lanes is not None, "load() first"
        is_query = prepared.batch.is_query
        parts: list[np.ndarray] = [np.empty((0, self.dim), np.float32)] * len(prepared.token_counts)
        for (indices, feed), hidden in self.bucket_outputs(prepared):
            vectors = self.projection(hidden, self.settings.normalize)
            keep = self.kept(feed, is_query)
            for row, i in enumerate(indices):
                parts[i] = vectors[row][keep[row]]
        multivector, offsets = join_rows(parts, self.dim)
        return EncodeResult(token_counts=prepared.token_counts, multivector=multivector, multivector_offsets=offsets)

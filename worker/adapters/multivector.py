"""ColBERT multi-vector embeddings (worker process): encoder tokens -> linear projection -> per-token L2 normalise.

Reads both checkpoint layouts: colbert-ir's (`linear.weight` inside the Hugging Face checkpoint, settings in
`artifact.metadata`) and sentence-transformers/PyLate's (`modules.json` with a `Dense` folder). Also owns
`token_rows`, the per-token rows the hybrid family shares (packed by `packing.join_rows`).

Encodes as colbert-ir and PyLate do: a query is padded to its fixed length with [MASK] tokens, which the real tokens
do not attend to but which are encoded and returned (query augmentation: every query has `query_max_length` rows);
a document's punctuation tokens are encoded but their rows dropped (the skiplist).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AddedToken, AutoModel, AutoTokenizer

from sie_worker.adapters.base import LoadInfo, Prepared, UnsupportedTask, truncates
from sie_worker.adapters.colbert_config import colbert_settings
from sie_worker.adapters.packing import join_rows
from sie_worker.adapters.torch_common import (
    Stopwatch,
    compute_dtype,
    memory_bytes,
    read_json,
    release,
    to_device,
    tokenize_in_buckets,
    torch_device,
    warm_up,
)
from sie_worker.protocol import EncodeBatch, EncodeResult, WorkerSpec
from sie_worker.st_layout import Layout, read_layout

_ACTIVATIONS = {"torch.nn.modules.linear.Identity": None, "torch.nn.modules.activation.Tanh": torch.tanh}


def token_rows(vectors: torch.Tensor, keep: torch.Tensor) -> list[np.ndarray]:
    """Each item's kept rows of [B, T, D], as float32 [kept, D] arrays."""
    rows, kept = vectors.float().cpu().numpy(), keep.bool().cpu().numpy()
    return [rows[b][kept[b]] for b in range(rows.shape[0])]


def project(hidden: torch.Tensor, projection: Callable[[torch.Tensor], torch.Tensor], normalize: bool) -> torch.Tensor:
    """Token vectors [B, T, D] through the projection, normalised in float32 (fp16 squares overflow in the norm)."""
    vectors = projection(hidden).float()
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors


@dataclass
class Projection:
    """The token projection: `linear` weight [dim, hidden], optional bias and activation."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    activation: str = "torch.nn.modules.linear.Identity"

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        out = F.linear(hidden, self.weight, self.bias)
        activation = _ACTIVATIONS[self.activation]
        return out if activation is None else activation(out)

    def to(self, device: torch.device, dtype: torch.dtype) -> Projection:
        bias = None if self.bias is None else self.bias.to(device, dtype)
        return Projection(self.weight.to(device, dtype), bias, self.activation)


def read_tensors(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Those of `names` stored in the folder's checkpoint (single or sharded safetensors, or pytorch_model.bin)."""
    index = read_json(folder / "model.safetensors.index.json")
    if isinstance(index, dict):
        weight_map: dict[str, str] = index.get("weight_map", {})
        return {n: _safetensor(folder / weight_map[n], n) for n in names if n in weight_map}
    if (folder / "model.safetensors").exists():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return {n: f.get_tensor(n) for n in names if n in f.keys()}  # noqa: SIM118 (safe_open has no __contains__)
    if (folder / "pytorch_model.bin").exists():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {n: state[n] for n in names if n in state}
    return {}


def _safetensor(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        tensor: torch.Tensor = f.get_tensor(name)
    return tensor


def find_projection(layout: Layout) -> Projection:
    """The sentence-transformers `Dense` module if `modules.json` names one, else colbert-ir's inline `linear`."""
    dense = layout.module("Dense")
    if dense is not None:
        found = read_tensors(dense.folder, ("linear.weight", "linear.bias"))
        activation = str(dense.config.get("activation_function") or "torch.nn.modules.linear.Identity")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unsupported Dense activation {activation!r} in {dense.folder}")
        return Projection(found["linear.weight"], found.get("linear.bias"), activation)
    found = read_tensors(layout.folder, ("linear.weight", "linear.bias"))
    if "linear.weight" not in found:
        raise ValueError(f"no ColBERT projection in {layout.folder}: neither a Dense module nor a linear.weight")
    return Projection(found["linear.weight"], found.get("linear.bias"))


def expansion_token_id(tokenizer: Any) -> int:
    """What pads a query: [MASK] in an encoder's vocabulary, else end-of-sequence, else padding (as PyLate picks)."""
    for candidate in (tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has no [MASK], end-of-sequence or padding token to expand queries with")


def expand_queries(tensors: dict[str, torch.Tensor], length: int, expansion_id: int,
                   attend: bool) -> dict[str, torch.Tensor]:
    """A bucket of tokenised queries padded (or cut back from its pad multiple) to exactly `length` columns, every
    padding position turned into `expansion_id`; the real tokens attend to those positions only when `attend`."""
    mask = tensors["attention_mask"]
    width = mask.shape[1]
    grown = {key: F.pad(value, (0, length - width)) if width < length else value[:, :length]
             for key, value in tensors.items()}
    real = grown["attention_mask"].bool()
    grown["input_ids"] = grown["input_ids"].masked_fill(~real, expansion_id)
    if attend:
        grown["attention_mask"] = torch.ones_like(grown["attention_mask"])
    return grown


def skiplist_ids(tokenizer: Any, words: list[str]) -> torch.Tensor:
    """Token ids of the skiplist words that are single entries of the vocabulary (a word the vocabulary lacks would
    map to [UNK], and dropping every unknown piece from documents is not what the skiplist means)."""
    ids = {tokenizer.convert_tokens_to_ids(word) for word in words}
    return torch.tensor(sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id), dtype=torch.long)


def register_prefix_tokens(tokenizer: Any, prefixes: list[str]) -> None:
    """Make a prefix the vocabulary knows (`[unused0]`, an added `[Q] `) come out as one token when prepended as text.

    ColBERT checkpoints were trained with the marker inserted as a token id; prepended as text, `[unused0]` would split
    on punctuation and an added `[Q] ` would be lower-cased out of a match. Registering it as a special,
    non-normalised token reproduces the trained tokenisation. Prefixes the vocabulary lacks stay plain text.
    """
    added = set(getattr(tokenizer, "added_tokens_encoder", None) or {})
    vocab = tokenizer.get_vocab()
    register = []
    for value in prefixes:
        for candidate in ((value, value.split(None, 1)[0]) if value.strip() else ()):
            if candidate in added or candidate in vocab:
                if tokenizer.tokenize(candidate) != [candidate]:
                    register.append(AddedToken(candidate, normalized=False, special=True))
                break
    if register:
        tokenizer.add_special_tokens({"extra_special_tokens": register}, replace_extra_special_tokens=False)


class MultivectorAdapter:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch_device(spec.device)
        self.weights_dir = Path(spec.weights_dir)
        self.layout = read_layout(self.weights_dir)
        settings = colbert_settings(spec, self.layout)
        self.query_prefix, self.doc_prefix = settings.query_prefix, settings.doc_prefix
        self.query_max_length, self.max_length = settings.query_max_length, settings.max_length
        self.normalize, self.token_dim = settings.normalize, settings.token_dim
        self.query_expansion, self.attend_to_expansion = settings.query_expansion, settings.attend_to_expansion
        self.skiplist_words = settings.skiplist_words

    def load(self) -> LoadInfo:
        encoder = self.layout.encoder_folder
        self.tokenizer = AutoTokenizer.from_pretrained(encoder, local_files_only=True)
        register_prefix_tokens(self.tokenizer, [self.query_prefix, self.doc_prefix])
        self.expansion_id = expansion_token_id(self.tokenizer)
        self.skiplist = skiplist_ids(self.tokenizer, self.skiplist_words).to(self.device)
        dtype = compute_dtype(self.spec.compute_precision, self.device)
        model = AutoModel.from_pretrained(encoder, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        projection = find_projection(self.layout).to(self.device, dtype)
        self.projection: Projection | None = projection
        self.dim = int(projection.weight.shape[0])
        if self.token_dim is not None and int(self.token_dim) != self.dim:
            raise ValueError(f"token_dim {self.token_dim} is configured but the checkpoint projects to {self.dim}")
        if self.max_length is None:
            self.max_length = min(int(self.tokenizer.model_max_length), 512)
        warm_up(lambda t: project(self.model(**to_device(t, self.device)).last_hidden_state, projection,
                                  self.normalize), self.tokenizer, self.max_length, self.spec, self.device)
        return LoadInfo(dims={"multivector": self.dim}, capabilities=["multivector"],
                        max_sequence_length=self.max_length)

    def prepare(self, batch: Any) -> Prepared:
        if not isinstance(batch, EncodeBatch):
            raise UnsupportedTask("this model only encodes")
        if set(batch.output_types) - {"multivector"}:
            raise UnsupportedTask(f"this model only has multivector outputs, not {sorted(batch.output_types)}")
        clock = Stopwatch()
        prefix = self.query_prefix if batch.is_query else self.doc_prefix
        texts = [prefix + (item.text or "") for item in batch.items]
        # Queries are always cut at query_max_length: the cap is part of how ColBERT encodes them, not a limit.
        truncate = batch.is_query or truncates(batch.options)
        max_length = self.query_max_length if batch.is_query else self.max_length
        buckets, counts = tokenize_in_buckets(self.tokenizer, texts, max_length, truncate=truncate,
                                              max_batch_tokens=self.spec.max_batch_tokens, device=self.device)
        if batch.is_query and self.query_expansion:
            buckets = [(indices, expand_queries(tensors, self.query_max_length, self.expansion_id,
                                                self.attend_to_expansion)) for indices, tensors in buckets]
        return Prepared(batch=batch, inputs=buckets, token_counts=counts, tokenize_ms=clock.ms())

    def _kept(self, inputs: dict[str, torch.Tensor], is_query: bool) -> torch.Tensor:
        """Which rows an item returns: every one of an expanded query; a document's real tokens off the skiplist."""
        if is_query:
            return torch.ones_like(inputs["input_ids"]) if self.query_expansion else inputs["attention_mask"]
        return inputs["attention_mask"].bool() & ~torch.isin(inputs["input_ids"], self.skiplist)

    def forward(self, prepared: Prepared) -> EncodeResult:
        parts: list[np.ndarray] = [np.empty((0, self.dim), np.float32)] * len(prepared.token_counts)
        projection = self.projection
        assert projection is not None, "forward after close"
        with torch.inference_mode():
            for indices, tensors in prepared.inputs:
                inputs = to_device(tensors, self.device)
                hidden = self.model(**inputs).last_hidden_state
                vectors = project(hidden, projection, self.normalize)
                kept = self._kept(inputs, prepared.batch.is_query)
                for i, rows in zip(indices, token_rows(vectors, kept), strict=True):
                    parts[i] = rows
        multivector, offsets = join_rows(parts, self.dim)
        return EncodeResult(token_counts=prepared.token_counts, multivector=multivector, multivector_offsets=offsets)

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def close(self) -> None:
        self.model = None
        self.projection = None
        release(self.device)


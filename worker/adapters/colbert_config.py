"""ColBERT's settings as a checkpoint and a profile declare them (worker process, free of torch): prefixes, lengths,
query expansion and the skiplist, shared by the torch adapter (`multivector`) and the lean one (`lean_multivector`).

The profile's option wins, else the checkpoint's (colbert-ir `artifact.metadata`, PyLate's configs), else the adapter's
fallback ([Q] / [D] markers, 32 query tokens, query expansion on, punctuation skipped).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from sie_worker.adapters.batching import read_json
from sie_worker.options import MultivectorOptions
from sie_worker.protocol import WorkerSpec
from sie_worker.st_layout import Layout


@dataclass(frozen=True)
class ColbertSettings:
    query_prefix: str
    doc_prefix: str
    query_max_length: int
    max_length: int | None  # documents'; None: the tokenizer's, at most 512
    normalize: bool
    token_dim: int | None
    query_expansion: bool
    attend_to_expansion: bool
    skiplist_words: list[str]


def colbert_settings(spec: WorkerSpec, layout: Layout) -> ColbertSettings:
    options = spec.options_as(MultivectorOptions)
    declared = checkpoint_defaults(layout)

    def chosen(name: str, fallback: Any) -> Any:
        """The profile's option, else the checkpoint's, else the adapter's fallback."""
        value = getattr(options, name)
        return value if value is not None else declared.get(name, fallback)

    return ColbertSettings(
        query_prefix=str(chosen("query_prefix", "[Q] ")), doc_prefix=str(chosen("doc_prefix", "[D] ")),
        query_max_length=int(chosen("query_max_length", 32)),
        max_length=spec.max_sequence_length or chosen("doc_max_length", None), normalize=options.normalize,
        token_dim=options.token_dim, query_expansion=bool(chosen("query_expansion", True)),
        attend_to_expansion=bool(chosen("attend_to_expansion_tokens", False)),
        skiplist_words=[str(w) for w in chosen("skiplist_words", list(string.punctuation))])


def checkpoint_defaults(layout: Layout) -> dict[str, Any]:
    """Prefixes and lengths as the checkpoint declares them (colbert-ir `artifact.metadata`, PyLate configs)."""
    found: dict[str, Any] = {}
    metadata = read_json(layout.folder / "artifact.metadata")
    if isinstance(metadata, dict):
        # colbert-ir inserts these vocabulary tokens as markers; a bare "[Q] " would be three word pieces there.
        found["query_prefix"] = str(metadata.get("query_token_id") or "[unused0]") + " "
        found["doc_prefix"] = str(metadata.get("doc_token_id") or "[unused1]") + " "
        found["query_max_length"] = metadata.get("query_maxlen")
        found["doc_max_length"] = metadata.get("doc_maxlen")
        found["attend_to_expansion_tokens"] = metadata.get("attend_to_mask_tokens")
        if metadata.get("mask_punctuation") is False:
            found["skiplist_words"] = []
    st, prompts = layout.config, layout.prompts
    found["query_prefix"] = st.get("query_prefix") or prompts.get("query") or found.get("query_prefix")
    found["doc_prefix"] = st.get("document_prefix") or prompts.get("document") or found.get("doc_prefix")
    found["query_max_length"] = st.get("query_length") or found.get("query_max_length")
    found["doc_max_length"] = st.get("document_length") or layout.max_seq_length or found.get("doc_max_length")
    for ours, theirs in (("query_expansion", "do_query_expansion"),
                         ("attend_to_expansion_tokens", "attend_to_expansion_tokens"),
                         ("skiplist_words", "skiplist_words")):
        if st.get(theirs) is not None:
            found[ours] = st[theirs]
    return {k: v for k, v in found.items() if v is not None}



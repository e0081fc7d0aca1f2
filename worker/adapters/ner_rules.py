"""The rules of the NER family that need no model (worker process, free of torch): BIO tags per token grouped into
character-offset entity spans, shared by the torch adapter (`ner`) and the lean one (`lean_ner`).

The grouping is transformers' "token-classification" pipeline with `aggregation_strategy="simple"`: each token takes
its argmax tag, adjacent tokens of one entity type merge unless a `B-` tag opens a new one, and the span's score is the
mean of its tokens' scores. Entity text is sliced from the input with the tokenizer's offsets, so it matches exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sie_sdk.types import Entity
from sie_worker.adapters.base import Prepared
from sie_worker.protocol import ExtractBatch, ExtractItem, ExtractResult

IGNORED = "O"


@dataclass
class Token:
    """One non-special token with its argmax tag."""

    tag: str
    score: float
    start: int
    end: int


def split_tag(tag: str) -> tuple[str, str]:
    """("B" or "I", entity type); a tag without a B-/I- prefix continues, like the pipeline's `get_tag`."""
    if tag.startswith(("B-", "I-")):
        return tag[0], tag[2:]
    return "I", tag


def group(tokens: list[Token]) -> list[list[Token]]:
    groups: list[list[Token]] = []
    for token in tokens:
        bi, kind = split_tag(token.tag)
        if groups and bi != "B" and split_tag(groups[-1][-1].tag)[1] == kind:
            groups[-1].append(token)
        else:
            groups.append([token])
    return groups


def entities(text: str, tokens: list[Token]) -> list[Entity]:
    found = []
    for members in group(tokens):
        label = members[0].tag.split("-", 1)[-1]  # the pipeline names a group after its first token's tag
        if label == IGNORED:
            continue
        start, end = members[0].start, members[-1].end
        score = float(np.mean(np.array([m.score for m in members], dtype=np.float32)))
        found.append(Entity(text=text[start:end], label=label, score=score, start=start, end=end))
    return found


def tagged_tokens(id2label: dict[int, str], scores: Sequence[float], tags: Sequence[int],
                  offsets: Sequence[Sequence[int]], special: Sequence[int]) -> list[Token]:
    """One item's tokens with their best tag and its probability, special tokens left out."""
    return [Token(id2label[int(tag)], float(score), int(start), int(end))
            for score, tag, (start, end), skip in zip(scores, tags, offsets, special, strict=True) if not skip]


def extract_result(prepared: Prepared, id2label: dict[int, str], scores: Sequence[Sequence[float]],
                   tags: Sequence[Sequence[int]]) -> ExtractResult:
    """The batch's entities from each item's best tag and its probability per token (padding dropped), with the
    offsets and special-token mask that `prepare` kept in `prepared.extra`. The batch's labels, where given, narrow a
    fixed tag set down to the types asked for."""
    batch = prepared.batch
    assert isinstance(batch, ExtractBatch)
    wanted = set(batch.labels)
    items = []
    for i, item in enumerate(batch.items):
        tokens = tagged_tokens(id2label, scores[i], tags[i], prepared.extra["offsets"][i], prepared.extra["special"][i])
        found = entities(item.text or "", tokens)
        if wanted:
            found = [e for e in found if e.label in wanted]
        items.append(ExtractItem(entities=found))
    return ExtractResult(items=items, token_counts=prepared.token_counts)

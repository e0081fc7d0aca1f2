"""The rules of the classifier family that need no model (worker process, free of torch): options, labels, texts and
hypotheses, shared by the torch adapter (`classifier`) and the lean one (`lean_classifier`)."""

from __future__ import annotations

from typing import Any

from sie_sdk.types import Classification
from sie_worker.adapters.base import BadInput
from sie_worker.protocol import ExtractBatch


def option(batch: ExtractBatch, name: str, configured: Any) -> Any:
    """The request's option, else the profile's (`configured`: its option Struct's field, defaults included)."""
    value = batch.options.get(name)
    return configured if value is None else value


def label_index(id2label: dict[int, str], prefix: str) -> int | None:
    for index, label in id2label.items():
        if label.lower().startswith(prefix):
            return int(index)
    return None


def texts_of(batch: ExtractBatch) -> list[str]:
    texts = [item.text for item in batch.items]
    for i, text in enumerate(texts):
        if text is None:
            raise BadInput(f"item {i} has no text; this model classifies text")
    return [t for t in texts if t is not None]


def sorted_classifications(labels: list[str], scores: list[float]) -> list[Classification]:
    pairs = sorted(zip(labels, scores, strict=True), key=lambda pair: pair[1], reverse=True)
    return [Classification(label=label, score=float(score)) for label, score in pairs]


def hypothesis(template: str, label: str) -> str:
    """The NLI hypothesis for one label, as the zero-shot pipeline formats it; BadInput for a template without {}."""
    try:
        out = template.format(label)
    except (IndexError, KeyError, ValueError) as exc:
        raise BadInput(f"hypothesis_template {template!r} does not format: {exc}") from None
    if out == template:
        raise BadInput(f"hypothesis_template {template!r} has no {{}} for the label")
    return out

"""The GLiNER adapter against `GLiNER.predict_entities` on the same tiny checkpoint (CPU)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sie_worker.adapters.base import Adapter, BadInput, UnsupportedTask
from sie_worker.protocol import EncodeBatch, ExtractBatch, ExtractResult, InputItem

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # gliner imports the deprecated torch.jit.script
    from gliner import GLiNER

TEXTS = ["Alice lives in Paris and works for Acme Corporation.", "Bob moved from Berlin to London last year!",
         "Nothing much here."]
LABELS = ["person", "location", "organization"]


def extract(adapter: Adapter, texts: list[str], labels: list[str], **options: Any) -> ExtractResult:
    batch = ExtractBatch(batch_id=1, items=[InputItem(text=t) for t in texts], labels=labels, options=options)
    result = adapter.forward(adapter.prepare(batch))
    assert isinstance(result, ExtractResult)
    return result


@pytest.fixture(scope="module")
def reference(models: Callable[[str], Path]) -> Any:
    return GLiNER.from_pretrained(str(models("gliner")), local_files_only=True)


@pytest.mark.parametrize("options", [{}, {"threshold": 0.3}, {"flat_ner": False, "threshold": 0.6},
                                     {"multi_label": True, "flat_ner": False}])
def test_entities_match_predict_entities(models: Callable[[str], Path], load: Callable[..., Adapter],
                                         reference: Any, options: dict[str, Any]) -> None:
    result = extract(load("gliner", models("gliner")), TEXTS, LABELS, **options)
    total = 0
    for text, item in zip(TEXTS, result.items, strict=True):
        want = reference.predict_entities(text, LABELS, **options)
        assert [(e.text, e.label, e.start, e.end) for e in item.entities] == [
            (w["text"], w["label"], w["start"], w["end"]) for w in want]
        assert [e.score for e in item.entities] == pytest.approx([w["score"] for w in want], abs=1e-5)
        assert all(e.text == text[e.start:e.end] for e in item.entities)
        total += len(item.entities)
    assert total > 0


def test_runtime_threshold_is_the_default(models: Callable[[str], Path], load: Callable[..., Adapter]) -> None:
    loose = extract(load("gliner", models("gliner"), options={"threshold": 0.1}), TEXTS, LABELS)
    strict = extract(load("gliner", models("gliner"), options={"threshold": 0.1}), TEXTS, LABELS, threshold=0.9)
    assert sum(map(len, (i.entities for i in loose.items))) > sum(map(len, (i.entities for i in strict.items)))


def test_labels_are_required(models: Callable[[str], Path], load: Callable[..., Adapter]) -> None:
    adapter = load("gliner", models("gliner"))
    with pytest.raises(BadInput, match="needs labels"):
        extract(adapter, TEXTS, [])
    with pytest.raises(UnsupportedTask):
        adapter.prepare(EncodeBatch(batch_id=1, items=[InputItem(text="x")], output_types=["dense"]))
    assert extract(adapter, TEXTS, LABELS).token_counts[0] > 5

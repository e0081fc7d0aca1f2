"""The classifier adapter against transformers' text-classification and zero-shot-classification pipelines (CPU)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from sie_worker.adapters.base import Adapter, BadInput, UnsupportedTask
from sie_worker.adapters.lean_classifier import LeanClassifierAdapter
from sie_worker.protocol import EncodeBatch, ExtractBatch, ExtractResult, InputItem

TEXTS = ["The weather is great today, I love sunny days.", "This movie was terrible and boring.",
         "Alice lives in Paris and works for Acme Corporation, a large company with offices in Berlin and London."]
LABELS = ["travel", "sports", "politics", "weather"]


@pytest.fixture(params=["torch", "openvino", "onnx"])
def load(load: Callable[..., Adapter], request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Adapter]:
    """Every test here runs on torch and on both lean runtimes, in float32 (the lean classifier is
    `lean_classifier`; its bf16 is checked in tests/adapters/test_lean_families.py)."""
    engine = str(request.param)
    if engine == "torch":
        return load
    cache = tmp_path_factory.getbasetemp() / "classifier-graphs"

    def lean(family: str, weights_dir: Path, options: dict[str, Any] | None = None, **fields: Any) -> Adapter:
        adapter = load(family, weights_dir, {"engine": engine, "onnx_cache_dir": str(cache), **(options or {})},
                       compute_precision="float32", **fields)
        assert isinstance(adapter, LeanClassifierAdapter)
        return adapter

    return lean


def extract(adapter: Adapter, texts: list[str], labels: list[str] | None = None, **options: Any) -> ExtractResult:
    batch = ExtractBatch(batch_id=1, items=[InputItem(text=t) for t in texts], labels=labels or [], options=options)
    result = adapter.forward(adapter.prepare(batch))
    assert isinstance(result, ExtractResult)
    assert len(result.items) == len(texts)
    return result


def assert_matches(result: ExtractResult, expected: list[list[tuple[str, float]]]) -> None:
    for item, want in zip(result.items, expected, strict=True):
        assert [c.label for c in item.classifications] == [label for label, _ in want]
        assert [c.score for c in item.classifications] == pytest.approx([s for _, s in want], abs=1e-5)


def text_classification(folder: Path, texts: list[str]) -> list[list[tuple[str, float]]]:
    classify = pipeline("text-classification", model=str(folder), top_k=None, device="cpu")
    return [[(d["label"], d["score"]) for d in found] for found in classify(texts)]


def zero_shot(folder: Path, texts: list[str], labels: list[str], **kwargs: Any) -> list[list[tuple[str, float]]]:
    classify = pipeline("zero-shot-classification", model=str(folder), device="cpu")
    found = classify(texts, candidate_labels=labels, **kwargs)
    return [list(zip(d["labels"], d["scores"], strict=True)) for d in found]


@pytest.mark.parametrize("name", ["sentiment", "multilabel"])
def test_plain_classification_matches_the_pipeline(models: Callable[[str], Path], load: Callable[..., Adapter],
                                                   name: str) -> None:
    result = extract(load("classifier", models(name)), TEXTS)
    assert_matches(result, text_classification(models(name), TEXTS))
    if name == "sentiment":  # softmax: the scores of one text sum to one
        assert sum(c.score for c in result.items[0].classifications) == pytest.approx(1.0, abs=1e-6)


def test_token_counts_are_the_unpadded_lengths(models: Callable[[str], Path], load: Callable[..., Adapter]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models("sentiment"))
    result = extract(load("classifier", models("sentiment")), TEXTS)
    assert result.token_counts == [len(tokenizer(t)["input_ids"]) for t in TEXTS]


def test_raw_scores_are_the_logits(models: Callable[[str], Path], load: Callable[..., Adapter]) -> None:
    folder = models("sentiment")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    result = extract(load("classifier", folder), TEXTS[:1], raw_scores=True)
    with torch.inference_mode():
        logits = model(**tokenizer(TEXTS[:1], return_tensors="pt")).logits[0].tolist()
    want = sorted(zip(["NEGATIVE", "POSITIVE"], logits, strict=True), key=lambda p: p[1], reverse=True)
    assert_matches(result, [want])


def test_zero_shot_single_label_matches_the_pipeline(models: Callable[[str], Path],
                                                     load: Callable[..., Adapter]) -> None:
    result = extract(load("classifier", models("nli")), TEXTS, LABELS)
    assert_matches(result, zero_shot(models("nli"), TEXTS, LABELS))
    assert sum(c.score for c in result.items[0].classifications) == pytest.approx(1.0, abs=1e-6)
    assert result.token_counts[0] > len(LABELS) * 5  # every (text, hypothesis) pair counts


def test_zero_shot_multi_label_and_template_match_the_pipeline(models: Callable[[str], Path],
                                                               load: Callable[..., Adapter]) -> None:
    template = "This text is about {}."
    adapter = load("classifier", models("nli"), options={"hypothesis_template": template})
    result = extract(adapter, TEXTS, LABELS, multi_label=True)
    assert_matches(result, zero_shot(models("nli"), TEXTS, LABELS, multi_label=True, hypothesis_template=template))


def test_zero_shot_with_one_label_scores_it_on_its_own(models: Callable[[str], Path],
                                                       load: Callable[..., Adapter]) -> None:
    # The pipeline treats a single label as multi-label: entailment against contradiction, not a softmax of one.
    result = extract(load("classifier", models("nli")), TEXTS, ["weather"])
    assert_matches(result, zero_shot(models("nli"), TEXTS, ["weather"]))


def test_zero_shot_without_labels_is_bad_input(models: Callable[[str], Path], load: Callable[..., Adapter]) -> None:
    with pytest.raises(BadInput, match="needs labels"):
        extract(load("classifier", models("nli")), TEXTS)
    with pytest.raises(BadInput, match="needs labels"):
        extract(load("classifier", models("sentiment"), options={"zero_shot": True}), TEXTS)


def test_nli_head_without_zero_shot_classifies_plainly(models: Callable[[str], Path],
                                                       load: Callable[..., Adapter]) -> None:
    result = extract(load("classifier", models("nli")), TEXTS, zero_shot=False)
    assert_matches(result, text_classification(models("nli"), TEXTS))


def test_bad_batches(models: Callable[[str], Path], load: Callable[..., Adapter]) -> None:
    adapter = load("classifier", models("sentiment"))
    with pytest.raises(BadInput, match="takes no labels"):
        extract(adapter, TEXTS, LABELS)
    with pytest.raises(BadInput, match="no text"):
        adapter.prepare(ExtractBatch(batch_id=1, items=[InputItem(images=[b"x"])]))
    with pytest.raises(UnsupportedTask):
        adapter.prepare(EncodeBatch(batch_id=1, items=[InputItem(text="x")], output_types=["dense"]))
    with pytest.raises(BadInput, match="no \\{\\}"):
        extract(load("classifier", models("nli")), TEXTS, LABELS, hypothesis_template="no placeholder")

"""The token-classification NER adapter against transformers' pipeline with `aggregation_strategy="simple"` (CPU)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from transformers import pipeline

from sie_worker.adapters.base import Adapter, UnsupportedTask
from sie_worker.adapters.ner_rules import Token, entities
from sie_worker.protocol import EncodeBatch, ExtractBatch, ExtractResult, InputItem

TEXTS = ["Alice lives in Paris and works for Acme Corporation.",
         "Bob moved from Berlin to London last year!",
         "Zyxxy Qworp, unseen-words & punctuation... in Kraków."]


def extract(adapter: Adapter, texts: list[str], labels: list[str] | None = None) -> ExtractResult:
    batch = ExtractBatch(batch_id=1, items=[InputItem(text=t) for t in texts], labels=labels or [])
    result = adapter.forward(adapter.prepare(batch))
    assert isinstance(result, ExtractResult)
    return result


def test_entities_match_the_simple_aggregation_pipeline(models: Callable[[str], Path],
                                                        load: Callable[..., Adapter]) -> None:
    result = extract(load("ner", models("ner")), TEXTS)
    reference = pipeline("token-classification", model=str(models("ner")), aggregation_strategy="simple",
                         device="cpu")
    total = 0
    for text, item, want in zip(TEXTS, result.items, reference(TEXTS), strict=True):
        assert [(e.label, e.start, e.end) for e in item.entities] == [(w["entity_group"], w["start"], w["end"])
                                                                      for w in want]
        assert [e.score for e in item.entities] == pytest.approx([float(w["score"]) for w in want], abs=1e-5)
        assert all(e.text == text[e.start:e.end] for e in item.entities)
        total += len(item.entities)
    assert total >= 3  # the random head tags enough tokens for the comparison to mean something


def test_labels_narrow_the_entity_types(models: Callable[[str], Path], load: Callable[..., Adapter]) -> None:
    adapter = load("ner", models("ner"))
    every = {e.label for item in extract(adapter, TEXTS).items for e in item.entities}
    keep = sorted(every)[:1]
    narrowed = extract(adapter, TEXTS, keep)
    assert {e.label for item in narrowed.items for e in item.entities} == set(keep)


def test_token_counts_and_task_guard(models: Callable[[str], Path], load: Callable[..., Adapter]) -> None:
    adapter = load("ner", models("ner"))
    result = extract(adapter, ["Alice", "Alice lives in Paris"])
    assert result.token_counts[0] < result.token_counts[1]
    with pytest.raises(UnsupportedTask):
        adapter.prepare(EncodeBatch(batch_id=1, items=[InputItem(text="x")], output_types=["dense"]))


def test_grouping_matches_the_pipeline_on_random_tag_runs(models: Callable[[str], Path]) -> None:
    # The random head tags nearly every token B-LOC; random tag runs exercise I- continuation, B- breaks, bare tags
    # and O gaps against the pipeline's own `group_entities`.
    reference = pipeline("token-classification", model=str(models("ner")), aggregation_strategy="simple",
                         device="cpu")
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "MISC", "I-MISC"]
    rng = random.Random(0)
    for _ in range(200):
        tokens = [Token(rng.choice(tags), rng.random(), 2 * i, 2 * i + 1) for i in range(rng.randint(1, 12))]
        text = " ".join("abcdefghijkl"[: len(tokens)])
        pre = [{"entity": t.tag, "score": np.float32(t.score), "word": "x", "start": t.start, "end": t.end}
               for t in tokens]
        want = [g for g in reference.group_entities(pre) if g["entity_group"] != "O"]
        got = entities(text, tokens)
        assert [(e.label, e.start, e.end) for e in got] == [(g["entity_group"], g["start"], g["end"]) for g in want]
        assert [e.score for e in got] == pytest.approx([float(g["score"]) for g in want], abs=1e-6)


def test_a_long_text_does_not_pad_the_batch_the_forwards_stay_within_the_token_budget(
        models: Callable[[str], Path], load: Callable[..., Adapter]) -> None:
    """Bucketed by length like the other families: short texts run apart from a long one, each forward holds at most
    the token budget (the warm-up's shape), and the entities are those of one text at a time."""
    budget = 64
    adapter = load("ner", models("ner"), max_batch_tokens=budget, max_sequence_length=48)
    texts = [*TEXTS[:2] * 3, " ".join(["Alice met Bob in Paris."] * 12)]
    shapes: list[tuple[int, ...]] = []
    hook = adapter.model.register_forward_pre_hook(  # type: ignore[attr-defined]
        lambda _module, _args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        batched = extract(adapter, texts)
    finally:
        hook.remove()
    assert len(shapes) > 1 and all(rows * length <= budget or rows == 1 for rows, length in shapes)
    assert max(length for _rows, length in shapes) == 48 and min(length for _rows, length in shapes) < 48
    for text, item in zip(texts, batched.items, strict=True):
        alone = extract(adapter, [text]).items[0]
        assert [(e.label, e.start, e.end) for e in item.entities] == [(e.label, e.start, e.end) for e in alone.entities]
        assert [e.score for e in item.entities] == pytest.approx([e.score for e in alone.entities], abs=1e-5)

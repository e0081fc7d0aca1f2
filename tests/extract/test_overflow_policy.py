"""`overflow_policy` (sie-native section 8) on every extract family and on cross-encoders, torch and lean: `default`
and `truncate_text` cut a text at the model's maximum; `error` refuses a batch with a longer text (400 INPUT_TOO_LONG,
counted before any cut) and takes one that fits; any other policy is 400 INVALID_INPUT."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sie_worker.adapters.base import Adapter, BadInput, InputTooLong
from sie_worker.protocol import ExtractBatch, ExtractResult, InputItem, ScoreBatch, ScoreResult
from tests import declared, tiny_models

declared.module("openvino")

LONG = " ".join(["paris is the capital and largest city of france"] * 60)  # over every tiny model's maximum
SHORT = "berlin is in germany"
# case -> (family, checkpoint, engine or None for a family without engines, labels)
CASES: dict[str, tuple[str, str, str | None, list[str]]] = {
    "ner-torch": ("ner", "ner", "torch", []),
    "ner-lean": ("ner", "ner", "auto", []),
    "classifier-torch": ("classifier", "sentiment", "torch", []),
    "classifier-lean": ("classifier", "sentiment", "auto", []),
    "zero-shot-torch": ("classifier", "nli", "torch", ["sports", "politics"]),
    "zero-shot-lean": ("classifier", "nli", "auto", ["sports", "politics"]),
    "gliner": ("gliner", "gliner", None, ["city"]),
}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("graphs")


def extract(adapter: Adapter, texts: list[str], labels: list[str], **options: Any) -> ExtractResult:
    batch = ExtractBatch(batch_id=1, items=[InputItem(text=t) for t in texts], labels=labels, options=options)
    result = adapter.forward(adapter.prepare(batch))
    assert isinstance(result, ExtractResult)
    return result


@pytest.mark.parametrize("case", list(CASES))
def test_overflow_policy(case: str, models: Callable[[str], Path], load: Callable[..., Adapter],
                         graphs: Path) -> None:
    family, checkpoint, engine, labels = CASES[case]
    options = None if engine is None else {"engine": engine, "onnx_cache_dir": str(graphs)}
    adapter = load(family, models(checkpoint), options=options)
    assert (type(adapter).__name__.startswith("Lean")) == (engine == "auto"), type(adapter).__name__
    cut = extract(adapter, [SHORT, LONG], labels)
    assert extract(adapter, [SHORT, LONG], labels, overflow_policy="truncate_text") == cut
    assert extract(adapter, [SHORT], labels, overflow_policy="error") == extract(adapter, [SHORT], labels)
    with pytest.raises(InputTooLong, match=r"input is \d+ tokens long, over this model's maximum of \d+"):
        extract(adapter, [SHORT, LONG], labels, overflow_policy="error")
    with pytest.raises(BadInput, match="overflow_policy must be one of default, truncate_text, error"):
        extract(adapter, [SHORT], labels, overflow_policy="drop")


@pytest.mark.parametrize("engine", ["torch", "auto"])
def test_overflow_policy_of_a_reranker(engine: str, load: Callable[..., Adapter], graphs: Path,
                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    adapter = load("cross_encoder", tiny_models.build_cross_encoder(tmp_path_factory.mktemp("reranker") / "model"),
                   options={"engine": engine, "onnx_cache_dir": str(graphs)})

    def scores(pairs: list[tuple[str, str]], **options: Any) -> list[float]:
        result = adapter.forward(adapter.prepare(ScoreBatch(batch_id=1, pairs=pairs, options=options)))
        assert isinstance(result, ScoreResult)
        return result.scores.numpy().tolist()

    pairs = [("capital of france", SHORT), ("capital of france", LONG)]
    assert scores(pairs, overflow_policy="truncate_text") == scores(pairs)
    assert scores(pairs[:1], overflow_policy="error") == scores(pairs[:1])
    with pytest.raises(InputTooLong, match=r"input is \d+ tokens long, over this model's maximum of \d+"):
        scores(pairs, overflow_policy="error")
    with pytest.raises(BadInput, match="overflow_policy must be one of default, truncate_text, error"):
        scores(pairs[:1], overflow_policy="drop")

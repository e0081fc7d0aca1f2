"""What a model's own files say for TEI's `/info` and prompts (router/models/model_card.py), in both
sentence-transformers layouts."""

from __future__ import annotations

import json
from pathlib import Path

from sie_router.models.model_card import read_card
from tests import tiny_models as tiny


def test_the_card_reads_the_classic_and_the_new_layout_alike(tmp_path: Path) -> None:
    classic = tiny.build_dense_st(tmp_path / "classic")
    (classic / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: "}, "default_prompt_name": "query"}))
    card = read_card(classic)
    assert (card.pooling, card.max_seq_length, card.prompts, card.default_prompt_name) == (
        "cls", 64, {"query": "query: "}, "query")
    new = tiny.build_dense_st(tmp_path / "new")
    modules = json.loads((new / "modules.json").read_text())
    modules[1]["type"] = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
    (new / "modules.json").write_text(json.dumps(modules))
    (new / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32,
                                                               "pooling_mode": "lasttoken"}))
    (new / "sentence_bert_config.json").write_text(json.dumps({"transformer_task": "feature-extraction"}))
    card = read_card(new)
    assert (card.pooling, card.max_seq_length, card.prompts) == ("last_token", None, {})  # TEI's name for it

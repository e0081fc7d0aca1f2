"""What a checkpoint's sentence-transformers files declare (worker process, free of torch): pooling, normalisation
and maximum length, read from `modules.json`, `1_Pooling/config.json` and `sentence_bert_config.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sie_worker.adapters.batching import read_json


def sentence_transformers_defaults(weights_dir: Path) -> dict[str, Any]:
    """Pooling, normalisation and max length as the checkpoint's sentence-transformers config declares them."""
    found: dict[str, Any] = {}
    modules = read_json(weights_dir / "modules.json")
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            found["normalize"] = True
        if kind.endswith("Pooling"):
            pooling = read_json(weights_dir / module.get("path", "1_Pooling") / "config.json") or {}
            if pooling.get("pooling_mode_cls_token"):
                found["pooling"] = "cls"
            elif pooling.get("pooling_mode_lasttoken"):
                found["pooling"] = "last"
            elif pooling.get("pooling_mode_mean_tokens"):
                found["pooling"] = "mean"
    max_len = (read_json(weights_dir / "sentence_bert_config.json") or {}).get("max_seq_length")
    if max_len:
        found["max_sequence_length"] = int(max_len)
    return found

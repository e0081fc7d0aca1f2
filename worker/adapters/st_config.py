"""What a checkpoint's sentence-transformers files declare (worker process, free of torch): pooling, normalisation
and maximum length, read from `modules.json`, `1_Pooling/config.json` and `sentence_bert_config.json`, and the
settings every dense engine resolves from them and the model config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sie_worker.adapters.batching import read_json
from sie_worker.protocol import WorkerSpec


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


@dataclass(frozen=True)
class DenseSettings:
    """A dense encoder's pooling, normalisation and maximum length (None: the tokenizer's, capped at 512)."""

    max_length: int | None
    pooling: str
    normalize: bool


def dense_settings(spec: WorkerSpec) -> DenseSettings:
    """The model config's options over the checkpoint's sentence-transformers files over the defaults (mean pooling,
    no normalisation), as every dense engine resolves them."""
    defaults = sentence_transformers_defaults(Path(spec.weights_dir))
    pooling = spec.loadtime.get("pooling") or spec.runtime.get("pooling")
    normalize = spec.loadtime.get("normalize", spec.runtime.get("normalize"))
    return DenseSettings(max_length=spec.max_sequence_length or defaults.get("max_sequence_length"),
                         pooling=str(pooling or defaults.get("pooling", "mean")),
                         normalize=bool(defaults.get("normalize", False) if normalize is None else normalize))

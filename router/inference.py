"""Inferring a model config from the files of a folder, as Infinity does (router process).

Used for `-m` models that are not in the bundle: `config.json` architectures and sentence-transformers
`modules.json` decide the adapter family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sie_router.weights import WeightsQuery, resolve_weights

if TYPE_CHECKING:
    from sie_router.registry import ModelConfig


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def infer_family(folder: Path) -> tuple[str, dict[str, Any], dict[str, int]]:
    """(adapter family, tasks, dims) for the checkpoint in `folder`."""
    config = _read(folder / "config.json") or {}
    architectures = [str(a) for a in config.get("architectures") or []]
    hidden = int(config.get("hidden_size") or config.get("projection_dim") or 0)
    if any(a.startswith("CLIP") for a in architectures):
        dim = int(config.get("projection_dim") or 512)
        return "clip", {"encode": {"dense": {"dim": dim}}}, {"dense": dim}
    if isinstance(_read(folder / "modules.json"), list):
        return "dense", {"encode": {"dense": {"dim": hidden}}}, {"dense": hidden}
    if any(a.endswith("ForMaskedLM") for a in architectures):
        vocab = int(config.get("vocab_size") or 0)
        return "sparse", {"encode": {"sparse": {"dim": vocab}}}, {"sparse": vocab}
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        labels = len(config.get("id2label") or {}) or int(config.get("num_labels") or 2)
        return ("cross_encoder", {"score": {}}, {}) if labels == 1 else ("classifier", {"extract": {}}, {})
    if any(a.endswith("ForTokenClassification") for a in architectures):
        return "ner", {"extract": {}}, {}
    return "dense", {"encode": {"dense": {"dim": hidden}}}, {"dense": hidden}


def infer_config(model: str, *, offline: bool) -> ModelConfig:
    """A config for a folder or hub id outside the bundle, found offline first."""
    from sie_router.registry import ModelConfig, Profile

    folder, origin = resolve_weights(WeightsQuery(model_id=model), offline=offline)
    family, tasks, _ = infer_family(folder)
    max_len = (_read(folder / "sentence_bert_config.json") or {}).get("max_seq_length")
    return ModelConfig(sie_id=model, weights_path=str(folder), tasks=tasks, max_sequence_length=max_len,
                       profiles={"default": Profile(adapter=family, max_batch_tokens=16384)},
                       source=f"inferred from {folder} ({origin})")

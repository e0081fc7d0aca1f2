"""What a model's own files say, for APIs that expose it (router process): TEI's `/info`, prompts and labels.

Read once per model from its local weights folder (never downloaded here: the worker's load does that) and cached.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import msgspec

from sie_router.models.config import ModelConfig
from sie_router.models.weights import WeightsNotFound, WeightsQuery, resolve_weights
from sie_worker.st_layout import read_layout

log = logging.getLogger("sie.model_card")

# TEI's names for sentence-transformers' pooling modes, where they differ.
TEI_POOLING = {"lasttoken": "last_token"}


class ModelCard(msgspec.Struct, frozen=True):
    """Facts from `config.json` and the sentence-transformers files; empty when the folder is not local."""

    prompts: dict[str, str] = {}
    default_prompt_name: str | None = None
    id2label: dict[str, str] = {}
    pooling: str | None = None
    max_seq_length: int | None = None
    torch_dtype: str | None = None


def _json(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    try:
        found = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return {}
    return found if isinstance(found, dict) else {}


def read_card(folder: Path) -> ModelCard:
    config = _json(folder, "config.json")
    layout = read_layout(folder)
    labels = {str(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    modes = layout.pooling
    return ModelCard(prompts=layout.prompts, default_prompt_name=layout.default_prompt_name, id2label=labels,
                     pooling=None if modes is None else TEI_POOLING.get(modes[0], modes[0]),
                     max_seq_length=layout.max_seq_length, torch_dtype=config.get("torch_dtype") or config.get("dtype"))


@lru_cache(maxsize=256)
def _card_of(query: WeightsQuery) -> ModelCard:
    folder, _ = resolve_weights(query, offline=True)  # WeightsNotFound is raised, so never cached
    return read_card(folder)


def model_card(config: ModelConfig) -> ModelCard:
    """The model's card (cached; blocking file reads the first time, so call it from a thread)."""
    if config.package_backed:
        return ModelCard()
    query = WeightsQuery(model_id=config.sie_id, hf_id=config.hf_id, weights_path=config.weights_path,
                         package_dir=config.package_dir, revision=config.hf_revision)
    try:
        return _card_of(query)
    except WeightsNotFound:  # not downloaded yet: an empty card now, the real one once the weights are there
        return ModelCard()
